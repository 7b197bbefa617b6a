package kaylewebhook

import (
	"context"
)

// forget deletes the "delivered" record of an event, so the next copy of it
// (an operator's replay from Kayle's dashboard) is forwarded again. It holds
// the event's storage lock meanwhile, taken as a copy takes it (a dead
// holder's lock is taken over): a copy being forwarded right now ends, and
// writes its record, before the record is looked at. found reports whether
// there was a delivered record, expired or not; a lease left by a failed
// forward is deleted too, but is not one.
func (d *deduper) forget(ctx context.Context, eventID string) (found bool, err error) {
	_, recordKey, lockName := d.eventKeys(eventID)
	var held *heldLock
	for held == nil {
		// nil while the holder that wrote a delivered record still holds
		// the lock: wait for it to let go
		if held, _, err = d.acquire(ctx, lockName, recordKey, eventID); err != nil {
			return false, err
		}
	}
	defer held.release()
	rec, err := d.loadRecord(ctx, recordKey)
	if err != nil {
		return false, err
	}
	if err := d.storage.Delete(ctx, recordKey); err != nil {
		return false, err
	}
	return rec != nil && !rec.DeliveredAt.IsZero(), nil
}

package kaylewebhook

import (
	"context"
	"errors"
	"io/fs"
)

// forget deletes the "delivered" record of an event, so the next copy of it
// (an operator's replay from Kayle's dashboard) is forwarded again. It holds
// the event's storage lock meanwhile: a copy being forwarded right now ends
// (and writes its record) before the record is looked at. found reports
// whether there was a record, expired or not.
func (d *deduper) forget(ctx context.Context, eventID string) (found bool, err error) {
	_, recordKey, lockName := d.eventKeys(eventID)
	if err := d.lock(ctx, lockName); err != nil {
		return false, err
	}
	defer d.unlock(lockName)
	if _, err := d.storage.Stat(ctx, recordKey); errors.Is(err, fs.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	if err := d.storage.Delete(ctx, recordKey); err != nil {
		return true, err
	}
	return true, nil
}

package kayle

import (
	"errors"
	"unicode"
	"unicode/utf8"
)

// maxJSONDepth matches encoding/json's nesting limit.
const maxJSONDepth = 10000

var errInvalidJSON = errors.New("invalid JSON")

// member is what scanJSON found of one of the names asked for.
type member struct {
	// value is the raw value of the member with exactly that name (after
	// unescaping), the last one where the name repeats; nil when absent.
	value []byte
	// ambiguous: another member's name is the same name to a decoder that
	// matches names case-insensitively (see foldEqual), or the name repeats.
	// A backend decoding into a struct could then read another value than
	// value.
	ambiguous bool
}

// scanJSON validates data as exactly one JSON value, accepting what
// encoding/json's Valid accepts, and sets found[i] to what it found of the
// member names[i] of the top-level object (names compare exactly, after
// unescaping; the last one wins where a name repeats, as in encoding/json;
// see member for the ambiguity it reports). found is the caller's, so it
// can live on the caller's stack.
//
// It exists for speed: a payload carrying a face image is hundreds of KB of
// one string, which encoding/json walks a state function per byte, twice
// (validate, then decode). Here string contents are a tight loop, and the
// document is walked once; only the small members asked for are decoded.
func scanJSON(data []byte, names []string, found []member) error {
	if len(names) > maxScanNames || len(found) < len(names) {
		panic("scanJSON: more names than it holds, or than found holds")
	}
	s := jsonScanner{data: data, names: names}
	s.skipSpace()
	err := s.value()
	s.skipSpace()
	if err == nil && s.pos != len(s.data) {
		err = errInvalidJSON
	}
	copy(found, s.found[:len(names)])
	return err
}

// maxScanNames is how many names scanJSON looks for at most: what it finds
// is kept in the scanner, which stays on the stack (a slice of the caller's
// would escape through the scanner's recursion).
const maxScanNames = 4

type jsonScanner struct {
	data  []byte
	pos   int
	depth int
	names []string
	found [maxScanNames]member
}

func (s *jsonScanner) skipSpace() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\t', '\n', '\r':
			s.pos++
		default:
			return
		}
	}
}

func (s *jsonScanner) value() error {
	if s.pos >= len(s.data) {
		return errInvalidJSON
	}
	switch c := s.data[s.pos]; {
	case c == '{':
		return s.object()
	case c == '[':
		return s.array()
	case c == '"':
		return s.str()
	case c == '-' || (c >= '0' && c <= '9'):
		return s.number()
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	}
	return errInvalidJSON
}

// enter consumes an opening bracket and reports whether the container is
// empty (its closing bracket consumed too).
func (s *jsonScanner) enter(closing byte) (empty bool, err error) {
	if s.depth++; s.depth > maxJSONDepth {
		return false, errInvalidJSON
	}
	s.pos++ // the opening bracket
	s.skipSpace()
	if s.pos < len(s.data) && s.data[s.pos] == closing {
		s.pos++
		s.depth--
		return true, nil
	}
	return false, nil
}

// next consumes what follows a container's element: a comma (more to come)
// or the closing bracket.
func (s *jsonScanner) next(closing byte) (more bool, err error) {
	s.skipSpace()
	if s.pos >= len(s.data) {
		return false, errInvalidJSON
	}
	switch s.data[s.pos] {
	case ',':
		s.pos++
		s.skipSpace()
		return true, nil
	case closing:
		s.pos++
		s.depth--
		return false, nil
	}
	return false, errInvalidJSON
}

func (s *jsonScanner) object() error {
	top := s.depth == 0
	if empty, err := s.enter('}'); empty || err != nil {
		return err
	}
	for {
		if s.pos >= len(s.data) || s.data[s.pos] != '"' {
			return errInvalidJSON
		}
		keyStart := s.pos
		if err := s.str(); err != nil {
			return err
		}
		key := s.data[keyStart:s.pos]
		s.skipSpace()
		if s.pos >= len(s.data) || s.data[s.pos] != ':' {
			return errInvalidJSON
		}
		s.pos++
		s.skipSpace()
		valueStart := s.pos
		if err := s.value(); err != nil {
			return err
		}
		if top {
			s.record(key, s.data[valueStart:s.pos])
		}
		if more, err := s.next('}'); !more || err != nil {
			return err
		}
	}
}

// record keeps value if the quoted key is one of the names asked for, and
// notes a name made ambiguous by this key.
func (s *jsonScanner) record(quotedKey, value []byte) {
	if len(s.names) == 0 {
		return
	}
	key := quotedKey[1 : len(quotedKey)-1]
	for i := range key {
		if key[i] == '\\' { // rare: compare the unescaped key
			var unescaped string
			if err := jsonUnmarshalString(quotedKey, &unescaped); err != nil {
				return
			}
			key = []byte(unescaped)
			break
		}
	}
	for i, name := range s.names {
		exact := string(key) == name
		if !exact && !foldEqual(key, name) {
			continue
		}
		m := &s.found[i]
		seen := m.value != nil || m.ambiguous // a key folding to name came before
		m.ambiguous = m.ambiguous || seen || !exact
		if exact {
			m.value = value
		}
	}
}

// foldEqual reports whether a decoder that matches member names to struct
// fields case-insensitively takes key for name (lower-case ASCII):
// encoding/json folds case as bytes.EqualFold does (Unicode simple folding,
// so U+017F 'ſ' is an 's' and U+212A KELVIN SIGN a 'k'), and
// encoding/json/v2's case-insensitive matching also ignores '_' and '-'.
// It is true for both, so "EVENT_ID", "eventId" and "event-id" are all
// event_id.
func foldEqual(key []byte, name string) bool {
	j := 0
	for i := 0; i < len(key); {
		r := rune(key[i])
		if r < utf8.RuneSelf {
			i++
			if r == '_' || r == '-' {
				continue
			}
		} else {
			var n int
			r, n = utf8.DecodeRune(key[i:])
			i += n
		}
		for j < len(name) && (name[j] == '_' || name[j] == '-') {
			j++
		}
		if j == len(name) || foldRune(r) != foldRune(rune(name[j])) {
			return false
		}
		j++
	}
	for j < len(name) && (name[j] == '_' || name[j] == '-') {
		j++
	}
	return j == len(name)
}

// foldRune returns the same rune for every rune of one case-folding orbit
// (the smallest, as encoding/json does).
func foldRune(r rune) rune {
	if r < utf8.RuneSelf {
		if 'a' <= r && r <= 'z' {
			r -= 'a' - 'A'
		}
		return r
	}
	for {
		r2 := unicode.SimpleFold(r)
		if r2 <= r {
			return r2
		}
		r = r2
	}
}

func (s *jsonScanner) array() error {
	if empty, err := s.enter(']'); empty || err != nil {
		return err
	}
	for {
		if err := s.value(); err != nil {
			return err
		}
		if more, err := s.next(']'); !more || err != nil {
			return err
		}
	}
}

// str validates a string starting at its opening quote. Invalid UTF-8 is
// accepted, as encoding/json does (it decodes it as U+FFFD).
func (s *jsonScanner) str() error {
	s.pos++ // the opening quote
	for {
		// the hot loop: plain string bytes
		for s.pos < len(s.data) {
			if c := s.data[s.pos]; c < 0x20 || c == '"' || c == '\\' {
				break
			}
			s.pos++
		}
		if s.pos >= len(s.data) {
			return errInvalidJSON
		}
		switch s.data[s.pos] {
		case '"':
			s.pos++
			return nil
		case '\\':
			if s.pos+1 >= len(s.data) {
				return errInvalidJSON
			}
			switch s.data[s.pos+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.pos += 2
			case 'u':
				if s.pos+6 > len(s.data) {
					return errInvalidJSON
				}
				for _, h := range s.data[s.pos+2 : s.pos+6] {
					if !isHexDigit(h) {
						return errInvalidJSON
					}
				}
				s.pos += 6
			default:
				return errInvalidJSON
			}
		default: // a control character
			return errInvalidJSON
		}
	}
}

func isHexDigit(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// number validates -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *jsonScanner) number() error {
	if s.data[s.pos] == '-' {
		s.pos++
	}
	if s.pos >= len(s.data) {
		return errInvalidJSON
	}
	if s.data[s.pos] == '0' {
		s.pos++
	} else if !s.digits() {
		return errInvalidJSON
	}
	if s.pos < len(s.data) && s.data[s.pos] == '.' {
		s.pos++
		if !s.digits() {
			return errInvalidJSON
		}
	}
	if s.pos < len(s.data) && (s.data[s.pos] == 'e' || s.data[s.pos] == 'E') {
		s.pos++
		if s.pos < len(s.data) && (s.data[s.pos] == '+' || s.data[s.pos] == '-') {
			s.pos++
		}
		if !s.digits() {
			return errInvalidJSON
		}
	}
	return nil
}

// digits consumes one or more decimal digits.
func (s *jsonScanner) digits() bool {
	start := s.pos
	for s.pos < len(s.data) && s.data[s.pos] >= '0' && s.data[s.pos] <= '9' {
		s.pos++
	}
	return s.pos > start
}

func (s *jsonScanner) literal(lit string) error {
	if len(s.data)-s.pos < len(lit) || string(s.data[s.pos:s.pos+len(lit)]) != lit {
		return errInvalidJSON
	}
	s.pos += len(lit)
	return nil
}

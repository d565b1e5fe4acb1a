package ca

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// journalVersion is bumped on incompatible changes to the journal format.
// Version 2 added the rotation fields; a version 1 journal reads as one
// with no rotation in progress.
const journalVersion = 2

// Journal records which CA keys and certificates are in use. It is small,
// rewritten whole and atomically on every transition, so a crash at any
// point leaves either the old or the new state on disk.
type Journal struct {
	Version int `json:"version"`
	// Current signs today.
	Current *Slot `json:"current"`
	// Next is a prepared successor, published in the trust bundle before it
	// signs anything (root rotation).
	Next *Slot `json:"next,omitempty"`
	// Retiring are former current slots, replaced by an activation, whose
	// roots stay in the trust bundle until the leaves they cover expire.
	Retiring []*Slot `json:"retiring,omitempty"`
	// PreparedAt and ActivatedAt date the steps of the rotation in
	// progress; ActivatedAt is kept until retirement.
	PreparedAt  *time.Time `json:"preparedAt,omitempty"`
	ActivatedAt *time.Time `json:"activatedAt,omitempty"`
}

// Slot is one root with the intermediate it currently signs through.
type Slot struct {
	RootKeyID           string `json:"rootKeyID"`
	RootCertPEM         string `json:"rootCertPEM"`
	IntermediateKeyID   string `json:"intermediateKeyID"`
	IntermediateCertPEM string `json:"intermediateCertPEM"`
}

// LoadJournal reads the journal at path. A missing journal is reported as an
// error matching fs.ErrNotExist.
func LoadJournal(path string) (*Journal, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ca: journal: %w", err)
	}
	j, err := parseJournal(data)
	if err != nil {
		return nil, fmt.Errorf("%w (%s)", err, path)
	}
	return j, nil
}

func parseJournal(data []byte) (*Journal, error) {
	var j Journal
	if err := json.Unmarshal(data, &j); err != nil {
		return nil, fmt.Errorf("ca: journal is corrupt: %w", err)
	}
	if j.Version != journalVersion && j.Version != 1 {
		return nil, fmt.Errorf("ca: journal has version %d, this meshca reads version %d", j.Version, journalVersion)
	}
	if j.Current == nil {
		return nil, fmt.Errorf("ca: journal has no current slot")
	}
	return &j, nil
}

func (j *Journal) marshal() ([]byte, error) {
	j.Version = journalVersion
	data, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("ca: journal: %w", err)
	}
	return data, nil
}

func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// Package vault is a keystore.Store that keeps the CA's keys in HashiCorp
// Vault's Transit secrets engine. Keys are created in Vault, non-exportable
// and without plaintext backup, and every signature is made by Vault: the
// private key never exists outside it. A key Transit reports as exportable
// is refused (ErrExportable), whoever created it.
//
// # Keys
//
// The key of type kt under id is the Transit key <KeyPrefix><id>.<kt>, for
// example meshca-root.ecdsa-p256. A Transit key's type is fixed, so each
// type has its own key. GenerateKey rotates that key when it exists, or
// creates it, and returns a signer pinned to the version it made; its
// public key is that version's. GetKey returns the latest version of
// whichever of the id's keys was created or rotated last. Old versions and
// the keys of other types stay, so signers already handed out keep signing;
// DeleteKey removes all of an id's keys.
//
// Each Sign is one request to <Mount>/sign/<key> with prehashed=true, the
// version pinned, hash_algorithm naming the digest, marshaling_algorithm
// asn1 for ECDSA, and signature_algorithm pkcs1v15 or pss (with its salt
// length) for RSA. The signature is verified against the public key before
// it is returned.
//
// # Login
//
// TokenAuth uses a token as given; AppRoleAuth and KubernetesAuth log in,
// lazily on first use or in Check. Run renews the token and logs in again
// before it expires, reading the secret ID or service account token file
// afresh each time; without Run a login-based store stops working when its
// first token expires. Check is the start-up probe; its errors name the
// cause (ErrUnreachable, ErrSealed, ErrLoginRefused, ErrPermissionDenied,
// ErrMountMissing) and match with errors.Is.
//
// # Policy
//
// The minimal policy for the default mount and a key prefix of "meshca-":
//
//	# GenerateKey (create or rotate), GetKey
//	path "transit/keys/meshca-*" {
//	  capabilities = ["read", "update"]
//	}
//	path "transit/keys/meshca-*/rotate" {
//	  capabilities = ["update"]
//	}
//	# Sign
//	path "transit/sign/meshca-*" {
//	  capabilities = ["update"]
//	}
//	# Check: the token's own capabilities, and its lifetime
//	path "sys/capabilities-self" {
//	  capabilities = ["update"]
//	}
//	path "auth/token/lookup-self" {
//	  capabilities = ["read"]
//	}
//	# Run: token renewal
//	path "auth/token/renew-self" {
//	  capabilities = ["update"]
//	}
//
// Transit treats every write to keys/<name>, creation included, as an
// update, so no "create" is needed. The last three paths come with Vault's
// default policy. DeleteKey needs two more:
//
//	path "transit/keys/meshca-*/config" {
//	  capabilities = ["update"]
//	}
//	path "transit/keys/meshca-*" {
//	  capabilities = ["read", "update", "delete"]
//	}
//
// The policy grants neither transit/export nor transit/backup, so keeping
// the keys in Vault does not rest on their non-exportable flag alone.
package vault

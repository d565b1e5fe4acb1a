package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/kubestate"
	"github.com/meshca/meshca/keystore/disk"
	"github.com/meshca/meshca/keystore/memory"
	"github.com/meshca/meshca/keystore/vault"
)

// keystoreOptions select and configure where the CA's keys live.
type keystoreOptions struct {
	backend        string
	dir            string
	passphraseFile string
	// intermediates is "shared" (one intermediate, recorded in the journal
	// with its key in the keystore), "per-replica" (each process signs its
	// own in memory), or empty for the backend's default.
	intermediates string
	secret        string
	vault         vaultOptions

	// kube and namespace locate the secret keystore's Secret; commands
	// that offer it set them before open.
	kube      func() (*rest.Config, error)
	namespace string
}

// vaultOptions are the flags of the vault keystore; they map one to one
// onto vault.Config.
type vaultOptions struct {
	addr, mount, keyPrefix, namespace  string
	caFile, serverName                 string
	auth                               string
	tokenFile                          string
	appRoleMount, roleID, secretIDFile string
	kubeMount, kubeRole, kubeTokenFile string
	timeout, checkTimeout              time.Duration
}

// bind adds the keystore flags; withMemory also offers an in-memory
// keystore, as its default (for benchmarks).
func (o *keystoreOptions) bind(fs *pflag.FlagSet, withMemory bool) {
	def, usage := "disk", "where the CA's keys live: disk (encrypted files), secret (the disk keystore's encrypted format in a Secret in --namespace, shared by replicas) or vault (HashiCorp Vault Transit: the root key never leaves Vault)"
	if withMemory {
		def, usage = "memory", "where the CA's keys live: memory, disk (encrypted files) or vault (HashiCorp Vault Transit)"
	}
	fs.StringVar(&o.backend, "keystore", def, usage)
	fs.StringVar(&o.dir, "keystore-dir", "", "disk keystore directory (default <data-dir>/keys)")
	fs.StringVar(&o.passphraseFile, "keystore-passphrase-file", "", "file holding the passphrase of the disk or secret keystore")
	fs.StringVar(&o.intermediates, "intermediates", "", "shared (one intermediate in the journal, its key in the keystore) or per-replica (each server process signs its own intermediate key, kept in memory, with the root; leaf issuance never calls the keystore); default: shared for disk, per-replica for secret and vault")
	if !withMemory {
		fs.StringVar(&o.secret, "keystore-secret", kubestate.DefaultKeysName, "with --keystore=secret: the Secret's name")
	}
	o.vault.bind(fs)
}

// bind adds the --vault-* flags.
func (v *vaultOptions) bind(fs *pflag.FlagSet) {
	fs.StringVar(&v.addr, "vault-addr", os.Getenv("VAULT_ADDR"), "Vault's address, https://host:8200 (plain http only on loopback); default $VAULT_ADDR")
	fs.StringVar(&v.mount, "vault-mount", vault.DefaultMount, "path of the Transit secrets engine")
	fs.StringVar(&v.keyPrefix, "vault-key-prefix", "meshca-", "prefix of meshca's Transit key names, so a Vault policy can be scoped to them")
	fs.StringVar(&v.namespace, "vault-namespace", os.Getenv("VAULT_NAMESPACE"), "Vault Enterprise namespace; default $VAULT_NAMESPACE")
	fs.StringVar(&v.caFile, "vault-ca-file", os.Getenv("VAULT_CACERT"), "PEM bundle of the CAs that sign Vault's certificate (default: system roots, or $VAULT_CACERT)")
	fs.StringVar(&v.serverName, "vault-server-name", "", "name expected in Vault's certificate when it differs from the host in --vault-addr")
	fs.StringVar(&v.auth, "vault-auth", "kubernetes", "how meshca logs in to Vault: kubernetes (its service account token), approle, or token")
	fs.StringVar(&v.tokenFile, "vault-token-file", "", "with --vault-auth=token: file holding the Vault token (default $VAULT_TOKEN)")
	fs.StringVar(&v.appRoleMount, "vault-approle-mount", vault.DefaultAppRoleMount, "with --vault-auth=approle: the AppRole auth method's path")
	fs.StringVar(&v.roleID, "vault-approle-role-id", "", "with --vault-auth=approle: the role ID")
	fs.StringVar(&v.secretIDFile, "vault-approle-secret-id-file", "", "with --vault-auth=approle: file holding the secret ID, read at every login")
	fs.StringVar(&v.kubeMount, "vault-kubernetes-mount", vault.DefaultKubernetesMount, "with --vault-auth=kubernetes: the Kubernetes auth method's path")
	fs.StringVar(&v.kubeRole, "vault-kubernetes-role", "meshca", "with --vault-auth=kubernetes: the Vault role bound to meshca's service account")
	fs.StringVar(&v.kubeTokenFile, "vault-kubernetes-token-file", vault.DefaultKubernetesTokenFile, "with --vault-auth=kubernetes: the service account token, read at every login")
	fs.DurationVar(&v.timeout, "vault-timeout", vault.DefaultRequestTimeout, "bound on each Vault request")
	fs.DurationVar(&v.checkTimeout, "vault-check-timeout", 30*time.Second, "how long start-up waits for Vault to answer the checks before it gives up")
}

// openedKeystore is a keystore ready for the CA.
type openedKeystore struct {
	keys       ca.KeyStore
	perReplica bool
	// run, when set, keeps the keystore's credentials fresh.
	run func(ctx context.Context) error
}

// open opens the configured keystore. A Vault that cannot serve meshca
// fails here, with the cause named, rather than at the first signature.
func (o *keystoreOptions) open(ctx context.Context, dataDir string, reg prometheus.Registerer, log *slog.Logger) (openedKeystore, error) {
	var k openedKeystore
	switch o.backend {
	case "memory":
		k.keys = memory.New()
	case "disk":
		dir := o.dir
		if dir == "" {
			dir = filepath.Join(dataDir, "keys")
		}
		store, err := openDiskKeystore(disk.Config{Dir: dir, Logger: log}, o.passphraseFile, "disk")
		if err != nil {
			return k, err
		}
		k.keys = store
	case "secret":
		store, err := o.openSecret(log)
		if err != nil {
			return k, err
		}
		// Per replica: a shared intermediate would be renewed by whichever
		// replica finds it due, each renewal a journal write.
		k.keys, k.perReplica = store, true
	case "vault":
		var err error
		if k, err = o.vault.openKeystore(ctx, reg, log); err != nil {
			return k, err
		}
	default:
		return k, fmt.Errorf("--keystore must be disk, secret or vault, not %q", o.backend)
	}
	switch o.intermediates {
	case "":
	case "shared":
		k.perReplica = false
	case "per-replica":
		k.perReplica = true
	default:
		return k, fmt.Errorf("--intermediates must be shared or per-replica, not %q", o.intermediates)
	}
	return k, nil
}

// openSecret opens the disk keystore's format in a Secret, created on the
// first write; replicas opening it with the same passphrase share its keys.
func (o *keystoreOptions) openSecret(log *slog.Logger) (*disk.Store, error) {
	if o.kube == nil {
		return nil, errors.New("--keystore=secret is offered by meshca server only")
	}
	if o.dir != "" {
		return nil, errors.New("--keystore-dir is for --keystore=disk; --keystore=secret keeps its files in --keystore-secret")
	}
	rc, err := o.kube()
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	files, err := kubestate.NewSecretFiles(kubestate.FilesConfig{Client: client, Namespace: o.namespace, Name: o.secret})
	if err != nil {
		return nil, err
	}
	store, err := openDiskKeystore(disk.Config{Files: files, Logger: log}, o.passphraseFile, "secret")
	if err != nil {
		return nil, err
	}
	log.Info("keystore in a Secret", "secret", o.namespace+"/"+o.secret)
	return store, nil
}

func (v *vaultOptions) config(reg prometheus.Registerer, log *slog.Logger) (vault.Config, error) {
	cfg := vault.Config{
		Address: v.addr, Mount: v.mount, KeyPrefix: v.keyPrefix, Namespace: v.namespace,
		TLS:            vault.TLSConfig{CAFile: v.caFile, ServerName: v.serverName},
		RequestTimeout: v.timeout, Logger: log, Metrics: vault.NewMetrics(reg),
	}
	if cfg.Address == "" {
		return cfg, errors.New("--keystore=vault needs --vault-addr (or $VAULT_ADDR)")
	}
	switch v.auth {
	case "token":
		token := os.Getenv("VAULT_TOKEN")
		if v.tokenFile != "" {
			b, err := os.ReadFile(v.tokenFile)
			if err != nil {
				return cfg, fmt.Errorf("--vault-token-file: %w", err)
			}
			token = strings.TrimSpace(string(b))
		}
		if token == "" {
			return cfg, errors.New("--vault-auth=token needs --vault-token-file or $VAULT_TOKEN")
		}
		cfg.Auth = vault.TokenAuth{Token: token}
	case "approle":
		cfg.Auth = vault.AppRoleAuth{Mount: v.appRoleMount, RoleID: v.roleID, SecretIDFile: v.secretIDFile}
	case "kubernetes":
		cfg.Auth = vault.KubernetesAuth{Mount: v.kubeMount, Role: v.kubeRole, TokenFile: v.kubeTokenFile}
	default:
		return cfg, fmt.Errorf("--vault-auth must be kubernetes, approle or token, not %q", v.auth)
	}
	return cfg, nil
}

// openKeystore opens the vault keystore with per-replica intermediates,
// so that leaf issuance never waits on Vault.
func (v *vaultOptions) openKeystore(ctx context.Context, reg prometheus.Registerer, log *slog.Logger) (openedKeystore, error) {
	store, err := v.open(ctx, reg, log)
	if err != nil {
		return openedKeystore{}, err
	}
	return openedKeystore{keys: store, run: store.Run, perReplica: true}, nil
}

func (v *vaultOptions) open(ctx context.Context, reg prometheus.Registerer, log *slog.Logger) (*vault.Store, error) {
	cfg, err := v.config(reg, log)
	if err != nil {
		return nil, err
	}
	store, err := vault.New(cfg)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, v.checkTimeout)
	defer cancel()
	if err := store.Check(ctx); err != nil {
		return nil, fmt.Errorf("the Vault keystore cannot be used (%s): %w", vaultHint(err), err)
	}
	log.Info("Vault keystore ready", "addr", v.addr, "mount", v.mount, "auth", v.auth)
	return store, nil
}

// vaultHint says what to look at for each cause Check reports.
func vaultHint(err error) string {
	switch {
	case errors.Is(err, vault.ErrUnreachable):
		return "check --vault-addr, the network path and --vault-ca-file"
	case errors.Is(err, vault.ErrSealed):
		return "Vault is sealed or not initialised: unseal it"
	case errors.Is(err, vault.ErrLoginRefused):
		return "Vault refused meshca's credentials: check --vault-auth and its role, secret or token"
	case errors.Is(err, vault.ErrPermissionDenied):
		return "the token's policies lack a capability on meshca's Transit keys; see docs/vault.md"
	case errors.Is(err, vault.ErrMountMissing):
		return "no Transit engine at --vault-mount: vault secrets enable -path=<mount> transit"
	default:
		return "see the error"
	}
}

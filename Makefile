# meshca: `make run` starts the development CA, `make test` runs every test.

GO            ?= go
BIN           := bin/meshca
VERSION       ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS       := -X main.version=$(VERSION)
STATICCHECK   := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME      ?= 60s
PKGS          := ./...
# Builds (once, then cached outside the repo) the pinned kube-apiserver and
# etcd that internal/testenv runs; prints their directory.
TESTENV       := bash hack/testenv.sh
# Likewise the pinned Vault server that internal/vaulttest runs.
VAULT         := bash hack/vault.sh

.PHONY: all build run test test-fast testenv lint bench fuzz image clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/meshca

# The embedded default: CA server, encrypted local keystore, self-signed root
# and a development token issuer, state in ./.meshca-dev.
run: build
	./$(BIN) dev

# Every test: formatting, vet, staticcheck, then all tests (fuzz seed corpora
# included) under the race detector, against a real kube-apiserver and etcd
# and a real Vault.
test: lint testenv
	bin=$$($(TESTENV) -q) && vbin=$$($(VAULT) -q) && \
	  MESHCA_KUBE_BIN_DIR=$$bin MESHCA_VAULT_BIN_DIR=$$vbin $(GO) test -race -count=1 $(PKGS)

# No race detector: the quick loop while editing. It still needs the
# apiserver and Vault (tests that use them fail rather than skip), which cost
# nothing once cached.
test-fast: testenv
	bin=$$($(TESTENV) -q) && vbin=$$($(VAULT) -q) && \
	  MESHCA_KUBE_BIN_DIR=$$bin MESHCA_VAULT_BIN_DIR=$$vbin $(GO) test -count=1 $(PKGS)

# kube-apiserver and etcd for internal/testenv (about 3.5 minutes the first
# time on 2 cores) and Vault for internal/vaulttest (about 15 minutes);
# milliseconds afterwards. MESHCA_CACHE_DIR moves the cache (default
# ~/.cache/meshca).
testenv:
	$(TESTENV)
	$(VAULT)

lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)

bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

# Fuzz each target for FUZZTIME (go test runs one fuzz target at a time).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParseCSR$$' -fuzztime $(FUZZTIME) ./ca/
	$(GO) test -run '^$$' -fuzz '^FuzzCreateCertificate$$' -fuzztime $(FUZZTIME) ./internal/certservice/

# The container image deploy/ runs (deploy/Dockerfile); push it where your
# cluster pulls from and point the kustomization's images: at it.
IMAGE ?= ghcr.io/meshca/meshca:$(VERSION)
image:
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) -t $(IMAGE) .

clean:
	rm -rf bin .meshca-dev

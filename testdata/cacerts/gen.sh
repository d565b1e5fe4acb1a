#!/usr/bin/env bash
# Regenerates this plugged-in CA fixture in Istio's cacerts layout: a root
# and an intermediate for trust domain cluster.local, valid for 100 years.
# TEST FIXTURE ONLY: its private key is public.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/root-key.pem"
openssl req -x509 -new -key "$tmp/root-key.pem" -sha256 -days 36500 -subj "/O=meshca test fixture/CN=fixture root CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:1" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectAltName=URI:spiffe://cluster.local" -out root-cert.pem
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out ca-key.pem
openssl req -new -key ca-key.pem -subj "/O=meshca test fixture/CN=fixture intermediate CA" -out "$tmp/ca.csr"
printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectAltName=URI:spiffe://cluster.local\n' > "$tmp/ext"
openssl x509 -req -in "$tmp/ca.csr" -CA root-cert.pem -CAkey "$tmp/root-key.pem" -CAserial "$tmp/root.srl" -CAcreateserial -days 36000 -sha256 \
  -extfile "$tmp/ext" -out ca-cert.pem
cat ca-cert.pem root-cert.pem > cert-chain.pem
chmod 600 ca-key.pem

# kl-proxy: every entry point a user or CI needs. Each target installs what it needs.
#   make setup   llama.cpp binaries, the SmolLM2 models, the wasm target (cached outside the repo)
#   make plugins the comparator plugins (WebAssembly components) into plugins/dist/
#   make build   the kl-proxy binary (release)
#   make test    every test, against real llama-servers
#   make demo    two llama-servers, the proxy, the bundled prompts, the summary
#   make lint    rustfmt and clippy, warnings as errors
#   make fuzz    the proptest fuzzers with many cases, bounded in time (FUZZ_CASES, FUZZ_SECONDS)

KLPROXY_CACHE ?= $(HOME)/.cache/kl-proxy
export KLPROXY_CACHE
CARGO ?= cargo

.PHONY: all setup plugins build test lint demo bench clean fuzz

all: build plugins

setup:
	@bash scripts/setup.sh

plugins: setup
	@$(MAKE) --no-print-directory -C plugins

build:
	$(CARGO) build --release -p kl-proxy

test: setup plugins
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --test-threads=2

# Stable Rust has no cargo-fuzz: the fuzzers are proptest properties (tests/fuzz.rs). Failing
# inputs persist to tests/fuzz-corpus/fuzz.proptest-regressions and are replayed first.
FUZZ_CASES ?= 5000
FUZZ_SECONDS ?= 900
fuzz:
	@PROPTEST_CASES=$(FUZZ_CASES) timeout --signal=INT $(FUZZ_SECONDS) \
		$(CARGO) test -p kl-proxy --test fuzz -- --test-threads=2; rc=$$?; \
	if [ $$rc = 124 ]; then echo "fuzz: $(FUZZ_SECONDS) s budget reached with no failure"; exit 0; fi; exit $$rc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

demo: setup plugins build
	@bash scripts/demo.sh

bench: setup plugins
	$(CARGO) build --release -p kl-proxy --bin kl-proxy --example bench
	@bash bench/bench.sh

clean:
	$(CARGO) clean
	rm -rf plugins/target plugins/dist

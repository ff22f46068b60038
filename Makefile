# Entry points for people and tools alike. Every target makes sure a nats-server >= 2.10 is
# available first (nats/install-nats-server.sh: PATH, or a project-local copy under .tools/).

SHELL := /bin/bash
CARGO ?= cargo
NATS_INSTALL := bash nats/install-nats-server.sh

.PHONY: run test bench lint nats-server clean-data

## Build and run everything on one machine (own nats-server, data in ./data, 127.0.0.1:8080).
run:
	@nats_bin=$$($(NATS_INSTALL)) && \
	$(CARGO) build --release -p chatd && \
	NATS_SERVER_BIN=$$nats_bin exec ./target/release/chatd run

## The whole test suite, against real nats-server processes the tests start themselves.
test:
	@nats_bin=$$($(NATS_INSTALL)) && export NATS_SERVER_BIN=$$nats_bin && \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## Benchmarks: JSON lines, each ours vs a baseline measured in the same run.
bench:
	@nats_bin=$$($(NATS_INSTALL)) && export NATS_SERVER_BIN=$$nats_bin && \
	$(CARGO) run --release -q -p chat-bench -- $(BENCH_ARGS)

## Formatting and lints, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Install nats-server (if missing) and print its path.
nats-server:
	@$(NATS_INSTALL)

## Remove the data of `make run` (the room logs included).
clean-data:
	rm -rf ./data

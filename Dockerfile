# Build: docker build -t registry.example.com/dssm-certs:0.1.0 .
# The binary links libssl.so.3 dynamically (openssl is used for RSA keys and DH parameters), so
# the final stage is distroless "cc" (glibc, libssl3), non-root, no shell.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin dssm-certs

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/dssm-certs /usr/local/bin/dssm-certs
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dssm-certs"]
CMD ["run"]

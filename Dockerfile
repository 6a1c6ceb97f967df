# Build: podman build -t registry.example.com/dssm-certs:0.1.0 .   (docker works the same)
# The binary links libssl.so.3 dynamically (openssl is used for RSA keys and DH parameters), so
# the final stage is distroless "cc" (glibc, libssl3), non-root, no shell.
#
# Both base images are pinned by digest: a tag moves, a digest does not. To update one, read
# the digest the registry serves for the tag now, then replace the sha256 below
# (docs/commands.md, "Container image"):
#   crane digest rust:1-bookworm
#   crane digest gcr.io/distroless/cc-debian12:nonroot
# (or `docker buildx imagetools inspect <image>`, `skopeo inspect docker://<image>`).
FROM rust:1-bookworm@sha256:93ce27a88655056a51dbdd8f5f2d7ddc071c7b0070fb288a37b5a285fc83971e AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every workspace member (Cargo.toml's [workspace] members: ., testcluster and testkit) and every target
# the manifest names (the benches), or cargo cannot load the workspace. tests/image.rs builds
# from exactly these COPY lines, so the two cannot drift apart.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY testcluster ./testcluster
COPY testkit ./testkit
RUN cargo build --release --locked --bin dssm-certs

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /src/target/release/dssm-certs /usr/local/bin/dssm-certs
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dssm-certs"]
CMD ["run"]

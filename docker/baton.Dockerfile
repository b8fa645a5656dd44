# syntax=docker/dockerfile:1
# baton: the rollout engine, and on Kubernetes its operator (`baton operator`,
# deploy/operator). A small non-root image. Build it from the repository root, the
# build context (baton is a member of the root workspace and builds against its
# Cargo.lock):
#
#   docker buildx build -f docker/baton.Dockerfile \
#     --build-arg BATON_BUILD_COMMIT="$(git rev-parse HEAD)" \
#     --platform linux/amd64,linux/arm64 -t baton .
ARG RUST_VERSION=1.95

# Build stage: runs on the build machine's platform and cross-compiles for the
# image's, so an arm64 image is not compiled under emulation. The exchange images'
# helper installs cargo-auditable (`tools`) and, for a cross build, the C cross
# toolchain and the Rust target (`setup`); its `build` is for the exchange package,
# so baton's build step is below.
FROM --platform=$BUILDPLATFORM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY --chmod=0755 examples/exchange/docker/build.sh /usr/local/bin/exchange-build
RUN exchange-build tools
ARG TARGETARCH
RUN exchange-build setup
COPY . .
# The commit `baton --version` names: the build context has no .git, so pass it,
# `--build-arg BATON_BUILD_COMMIT=$(git rev-parse HEAD)` (cut to 12 digits, as a
# build from a checkout gives); without it the version says `unknown commit`.
ARG BATON_BUILD_COMMIT=
# cargo-auditable embeds the list of crates the binary was built from, which the
# image's vulnerability scan (Trivy) and SBOM (Syft) read.
RUN --mount=type=cache,id=cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=baton-target-${TARGETARCH},target=/src/target <<'BUILD'
#!/usr/bin/env bash
set -euo pipefail
commit=${BATON_BUILD_COMMIT:-}
export BATON_BUILD_COMMIT="${commit:0:12}"
case "$TARGETARCH" in
  amd64) target=x86_64-unknown-linux-gnu; prefix=x86_64-linux-gnu ;;
  arm64) target=aarch64-unknown-linux-gnu; prefix=aarch64-linux-gnu ;;
  *) echo "baton.Dockerfile: no build for TARGETARCH=$TARGETARCH; amd64 and arm64 are supported" >&2; exit 1 ;;
esac
if [ "$target" != "$(rustc -vV | sed -n 's/^host: //p')" ]; then
  # The linker for the target, and the C compiler for the crates that build C
  # (ring, SQLite).
  triple=${target//-/_}
  export "CARGO_TARGET_${triple^^}_LINKER=${prefix}-gcc"
  export "CC_${triple}=${prefix}-gcc" "AR_${triple}=${prefix}-ar"
fi
cargo auditable build --release --locked --target "$target" -p baton --bin baton
install -D -m 0755 "target/$target/release/baton" /out/baton
BUILD

# Runtime: glibc and libgcc only (and CA certificates, for Prometheus and webhooks
# over HTTPS); no shell, no package manager; user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/baton /usr/local/bin/baton
USER 65532:65532
# 8080: /healthz and /readyz; 9090: /metrics (deploy/operator/deployment.yaml).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/baton"]

#!/usr/bin/env bash
# Builds one exchange binary inside the Dockerfiles' build stage, for the platform of
# the image being built. The build stage runs on the build machine's own platform
# ($BUILDPLATFORM) and cross-compiles for $TARGETARCH, so that a multi-arch image
# does not compile Rust under emulation.
#
#   build.sh tools               install cargo-auditable (the same for every target)
#   build.sh setup               for a cross build: the C cross toolchain, the Rust target
#   build.sh build BIN OUTDIR    build the release binary BIN into OUTDIR
#
# The binary is built with cargo-auditable, which embeds the list of crates it was
# built from: that is what lets the image's vulnerability scan (Trivy) and its SBOM
# (Syft) see the Rust dependencies inside a distroless image that has no Cargo.lock.
set -euo pipefail

CARGO_AUDITABLE_VERSION=0.7.5

# Sets target (Rust), prefix (GNU toolchain) and debarch (Debian) for $TARGETARCH.
target_of() {
  case "${TARGETARCH:?TARGETARCH is set by BuildKit (docker buildx build)}" in
    amd64) target=x86_64-unknown-linux-gnu; prefix=x86_64-linux-gnu; debarch=amd64 ;;
    arm64) target=aarch64-unknown-linux-gnu; prefix=aarch64-linux-gnu; debarch=arm64 ;;
    *) echo "build.sh: no build for TARGETARCH=$TARGETARCH; amd64 and arm64 are supported" >&2; exit 1 ;;
  esac
  host=$(rustc -vV | sed -n 's/^host: //p')
}

case "${1:-}" in
  tools)
    cargo install --locked cargo-auditable --version "$CARGO_AUDITABLE_VERSION"
    ;;
  setup)
    target_of
    if [ "$target" != "$host" ]; then
      # Debian's cross compilers: gcc-x86-64-linux-gnu, gcc-aarch64-linux-gnu.
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "gcc-${prefix//_/-}" "libc6-dev-${debarch}-cross" >/dev/null
      rm -rf /var/lib/apt/lists/*
      rustup target add "$target"
    fi
    ;;
  build)
    bin=${2:?usage: build.sh build BIN OUTDIR}
    out=${3:?usage: build.sh build BIN OUTDIR}
    target_of
    if [ "$target" != "$host" ]; then
      # The linker for the target, and the C compiler for the crates that build C
      # (ring, SQLite).
      triple=${target//-/_}
      export "CARGO_TARGET_${triple^^}_LINKER=${prefix}-gcc"
      export "CC_${triple}=${prefix}-gcc" "AR_${triple}=${prefix}-ar"
    fi
    cargo auditable build --release --locked --target "$target" -p exchange --bin "$bin"
    install -D -m 0755 "target/$target/release/$bin" "$out/$bin"
    ;;
  *)
    echo "usage: build.sh tools | build.sh setup | build.sh build BIN OUTDIR" >&2
    exit 2
    ;;
esac

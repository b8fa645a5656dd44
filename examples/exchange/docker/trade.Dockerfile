# syntax=docker/dockerfile:1
# exchange-trade: limit orders and matching.
# A small non-root image. Build it from the repository root, the build context (the
# exchange is a member of the root workspace and builds against its Cargo.lock):
#
#   docker buildx build -f examples/exchange/docker/trade.Dockerfile \
#     --platform linux/amd64,linux/arm64 --build-arg APP_VERSION=$(git rev-parse --short HEAD) .
ARG RUST_VERSION=1.95

# Build stage: runs on the build machine's platform and cross-compiles for the
# image's (see build.sh), so an arm64 image is not compiled under emulation.
FROM --platform=$BUILDPLATFORM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY --chmod=0755 examples/exchange/docker/build.sh /usr/local/bin/exchange-build
RUN exchange-build tools
ARG TARGETARCH
RUN exchange-build setup
COPY . .
RUN --mount=type=cache,id=cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=exchange-target-${TARGETARCH},target=/src/target \
    exchange-build build exchange-trade /out

# Runtime: glibc and libgcc only; no shell, no package manager; user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG APP_VERSION=dev
ENV APP_VERSION=${APP_VERSION} PORT=8080
COPY --from=build /out/exchange-trade /usr/local/bin/exchange-trade
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/exchange-trade"]

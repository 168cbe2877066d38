#!/usr/bin/env bash
# Build build/cpp/ideogram4_client from proto/ideogram4.proto and clients/cpp/ideogram4_client.cc with Debian's
# gRPC C++ (libgrpc++-dev, protobuf-compiler-grpc). Uses the system's packages when they are installed;
# otherwise downloads the same Debian packages (and whatever they need that the system lacks) into
# build/cpp/deps with a private apt state (-o options: the system's apt state and packages are not changed)
# and unpacks them there; the binary finds those libraries through its rpath.
# Exit codes: 0 built (or up to date); 3 the packages cannot be obtained here (reason in build/cpp/UNAVAILABLE,
# the C++ test then skips with it); 1 a build error.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/build/cpp}
src=("$root/proto/ideogram4.proto" "$root/clients/cpp/ideogram4_client.cc" "$0")
mkdir -p "$out"
rm -f "$out/UNAVAILABLE"
if [ -x "$out/ideogram4_client" ] && [ -z "$(find "${src[@]}" -newer "$out/ideogram4_client")" ]; then
  exit 0
fi
unavailable() { echo "$1" > "$out/UNAVAILABLE"; echo "clients/cpp/build.sh: $1" >&2; exit 3; }
command -v g++ >/dev/null || unavailable "no C++ compiler (g++): apt-get install g++"
multiarch=$(gcc -dumpmachine)
packages=(libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler pkg-config)
rpath=()
if pkg-config --exists grpc++ protobuf 2>/dev/null && command -v protoc >/dev/null && command -v grpc_cpp_plugin >/dev/null
then
  echo "clients/cpp: the system's gRPC $(pkg-config --modversion grpc++)" >&2
else
  deps=$out/deps
  if [ ! -f "$deps/.unpacked" ]; then
    command -v apt-get >/dev/null || unavailable "no apt-get and no system gRPC C++: install ${packages[*]}"
    rm -rf "$deps"
    mkdir -p "$deps/lists/partial" "$deps/cache/archives/partial"
    o=(-o Dir::State::Lists="$deps/lists" -o Dir::Cache="$deps/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    echo "clients/cpp: fetching ${packages[*]} into $deps (private apt state)" >&2
    apt-get "${o[@]}" -qq update >"$deps/apt.log" 2>&1 ||
      unavailable "apt-get update failed (no access to the Debian archive?): $(tail -1 "$deps/apt.log")"
    apt-get "${o[@]}" -qq -y --download-only --no-install-recommends install "${packages[@]}" >>"$deps/apt.log" 2>&1 ||
      unavailable "apt-get could not download ${packages[*]}: $(tail -1 "$deps/apt.log")"
    for deb in "$deps"/cache/archives/*.deb; do
      [ -e "$deb" ] && dpkg -x "$deb" "$deps/root"
    done
    mkdir -p "$deps/root/usr/lib/$multiarch"
    # a -dev package's libX.so points at libX.so.N; when the system already has that runtime package, apt did
    # not download it: point the link at the system's copy
    for link in "$deps/root/usr/lib/$multiarch"/*.so; do
      if [ -L "$link" ] && [ ! -e "$link" ] && [ -e "/usr/lib/$multiarch/$(readlink "$link")" ]; then
        ln -sf "/usr/lib/$multiarch/$(readlink "$link")" "$link"
      fi
    done
    touch "$deps/.unpacked"
  fi
  prefix=$deps/root
  export PATH="$prefix/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$prefix/usr/lib/$multiarch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PKG_CONFIG_PATH="$prefix/usr/lib/$multiarch/pkgconfig:$prefix/usr/share/pkgconfig"
  export PKG_CONFIG_SYSROOT_DIR="$prefix"
  # DT_RPATH (not RUNPATH): it also applies to the libraries libgrpc++ itself loads
  rpath=("-Wl,--disable-new-dtags,-rpath,$prefix/usr/lib/$multiarch")
  command -v pkg-config >/dev/null || unavailable "no pkg-config"
fi
gen=$out/gen
rm -rf "$gen" && mkdir -p "$gen"
protoc -I "$root/proto" --cpp_out="$gen" --grpc_out="$gen" --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" \
  "$root/proto/ideogram4.proto"
# shellcheck disable=SC2046 -- pkg-config prints several words on purpose
g++ -std=c++17 -O1 -I"$gen" "$gen/ideogram4.pb.cc" "$gen/ideogram4.grpc.pb.cc" "$root/clients/cpp/ideogram4_client.cc" \
  $(pkg-config --cflags --libs grpc++ protobuf) "${rpath[@]}" -o "$out/ideogram4_client.tmp"
mv "$out/ideogram4_client.tmp" "$out/ideogram4_client"
echo "built $out/ideogram4_client" >&2

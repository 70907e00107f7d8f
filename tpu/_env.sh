# Settings and helpers shared by the tpu/ scripts, which source this file without arguments.
#
# `--dry-run` as a script's first argument (it is shifted off here, from the script's own arguments):
# every external command is printed, shell-quoted, one a line, instead of run. Notes go to stderr.
TPU_NAME=${TPU_NAME:-polmjax}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
ALGORITHMS=(sft dpo rm kto grpo)  # the polmjax commands that take experiments/<algo>/<name>.py
DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi

# run CMD [ARG...]: run it, or under --dry-run print it as one copy-pasteable line.
run() { if ((DRY_RUN)); then quote "$@"; echo; else "$@"; fi; }

ssh_all() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

# quote WORD...: the words as shell, quoted like Python's shlex.join (bare when safe, else '...').
quote() {
  local word sep=""
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s%s' "$sep" "$word"
    else printf "%s'%s'" "$sep" "${word//"'"/"'\"'\"'"}"; fi
    sep=" "
  done
}

note() { echo "$*" >&2; }
die() { echo "${0##*/}: $*" >&2; exit 2; }

# experiment PATH: sets EXPERIMENT (PATH relative to $REPO, as every host sees it under ~/polmjax) and
# ALGO (its folder, which must be a polmjax training command), or stops with what to fix.
experiment() {
  [[ -f $1 ]] || die "no experiment file '$1'"
  local abs repo
  abs="$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")"
  repo=$(cd "$REPO" && pwd -P)
  [[ $abs == "$repo"/* ]] || die "'$1' is outside $repo, the checkout that setup.sh copies to the hosts"
  EXPERIMENT=${abs#"$repo"/}
  ALGO=$(basename "$(dirname "$EXPERIMENT")")
  [[ " ${ALGORITHMS[*]} " == *" $ALGO "* ]] ||
    die "'$1' is in '$ALGO/', not an algorithm folder: pass experiments/<algo>/<name>.py with algo one of ${ALGORITHMS[*]}"
}

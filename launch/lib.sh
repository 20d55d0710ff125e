# shellcheck shell=bash
# Shared helpers of the launchers that run in place (gpu_node.sh, tpu_vm.sh); sourced, not executed.
# slurm.sbatch keeps its own copy: sbatch runs a spooled copy of the script, which cannot find this file.
# The sourcing script sets DRY_RUN before calling run.

# Shell-quotes one word so that the shell reads it back unchanged: bare when it is safe, else in single quotes,
# else (it holds a single quote but nothing double quotes would expand) in double quotes, else '...'\''...'.
quote() {
  local LC_ALL=C
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 != *"'"* ]]; then
    printf "'%s'" "$1"
  elif [[ $1 != *[\$\`\\\"!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command as one copy-pasteable line.
quote_cmd() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s\n' "$out"
}

# Runs a command (echoed to stderr with a '+ ' prefix), or only prints it with --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

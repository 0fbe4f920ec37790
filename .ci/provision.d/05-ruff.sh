# Lint first: `ruff check` (configured in pyproject.toml) must report nothing.
# Sourced by .ci/run under `set -e`: a finding fails the run here.  ruff goes
# into a throw-away venv, never into the shared interpreter.
ci_ruff_venv=$(mktemp -d /var/tmp/blkcache-ruff.XXXXXX)
python3 -m venv "$ci_ruff_venv"
"$ci_ruff_venv/bin/pip" install -q ruff
echo "+ ruff check ."
ci_ruff_status=0
"$ci_ruff_venv/bin/ruff" check --no-cache . || ci_ruff_status=$?
rm -rf "$ci_ruff_venv"
[ "$ci_ruff_status" -eq 0 ]
unset ci_ruff_venv ci_ruff_status

#!/usr/bin/env bash
# System packages the test suite uses beyond the Python venv (Debian/Ubuntu):
#   chromium  - tests/test_html_report.py screenshots the HTML report headless (skips without it)
#   graphviz  - `dot` draws the FX graph pictures (without it fxpress falls back to a matplotlib layout)
# Idempotent: installs only what is missing. Needs root or sudo; without either it says so and
# exits 0, so the tests that need these packages skip instead of the whole run failing.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium fonts-liberation)
command -v dot >/dev/null 2>&1 || need+=(graphviz)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-system-deps: no apt-get here; install ${need[*]} yourself (the tests that need them will skip)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ci-system-deps: not root and no sudo; skipping install of ${need[*]} (the tests that need them will skip)" >&2
        exit 0
    fi
fi
echo "ci-system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

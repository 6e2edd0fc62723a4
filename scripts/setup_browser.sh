#!/usr/bin/env bash
# The headless browser the chat page's tests drive (tests/test_chat_page.py): Debian's chromium and
# chromedriver, installed with apt-get if they are missing (selenium itself comes with `.[dev]`).
set -euo pipefail
need_install=()
command -v chromium >/dev/null 2>&1 || need_install+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_install+=(chromium-driver)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_install[@]}"
fi

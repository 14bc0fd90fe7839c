# Sourced by the other scripts: make sure .venv exists and holds the project with its dev tools.
# Reinstalls when pyproject.toml changed since the last install.
venv=.venv
stamp=$venv/.installed
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e '.[dev,fast,bench,knowledge,web]'
  touch "$stamp"
fi

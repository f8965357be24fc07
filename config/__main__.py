"""`python -m config`: the resolved settings as shell-quoted `KEY=value` lines.

For people and scripts: what every mlx-ring process reads, after precedence
(environment, then the env file, then the defaults) and validation (`eval` takes the
output as is). An empty value stands for None. A bad setting exits with status 2 and
the error naming the variable.
"""

from __future__ import annotations

import shlex
import sys

from config import Settings, settings_or_exit


def shell_lines(settings: Settings) -> list[str]:
    lines = []
    for name, value in settings.model_dump().items():
        text = "" if value is None else str(value)
        lines.append(f"{name.upper()}={shlex.quote(text)}")
    return lines


def main() -> int:
    settings = settings_or_exit()
    print("\n".join(shell_lines(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's quick start runs as written (on the CPU: the reference implementation)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_start_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    quick_start = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md (quick start)", "exec"), scope)
    assert scope["y8"].shape == scope["yf"].shape == scope["yt"].shape == (8, 1024)
    assert scope["g"].shape == scope["w"].shape

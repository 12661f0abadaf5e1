"""The README's Python examples run as written (each in a fresh namespace)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i + 1}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code):
    for library in re.findall(r"^(?:import|from) (timm|monai|torchvision)\b", code, re.MULTILINE):
        pytest.importorskip(library, reason=f"the example needs {library}")
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})

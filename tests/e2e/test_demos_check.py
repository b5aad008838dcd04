"""`make demos` (tests/demos_check.py) reads the README's three demo tables and names every number a run missed."""

from __future__ import annotations

import pytest

from tests.demos_check import DEMOS, ROOT, misses, readme_table, spread_rows


def test_every_demo_has_a_readme_table_with_teacher_before_and_after():
    readme = (ROOT / "README.md").read_text()
    for demo in DEMOS:
        table = readme_table(readme, demo)
        assert set(table) == {"teacher", "student_before", "student_after"}
        assert all(0 <= value <= 1 for value in table.values()), (demo, table)
        assert table["student_after"] > table["student_before"], (demo, table)


def test_a_table_row_is_read_from_the_first_number_of_its_cell():
    readme = ("### Text (`mmopd demo text`)\nprose 0.5\n\n| model | accuracy |\n|---|---|\n| teacher | 1.000 |\n"
              "| student before | 0.314 ± 0.02 |\n| student after OPD | **0.914** (0.33 at step 50) |\n### Next\n"
              "| teacher | 0.1 |\n")
    assert readme_table(readme, "text") == {"teacher": 1.0, "student_before": 0.314, "student_after": 0.914}
    with pytest.raises(ValueError, match="no heading naming `mmopd demo vlm`"):
        readme_table(readme, "vlm")
    with pytest.raises(ValueError, match=r"lacks rows \['student_after'\]"):
        readme_table(readme.replace("| student after OPD", "| after"), "text")


def test_only_numbers_beyond_the_tolerance_are_misses():
    expected = {"teacher": 0.9, "student_before": 0.4, "student_after": 0.89}
    run = {"teacher": 0.93, "student_before": 0.37, "student_after": 0.80}
    lines = misses("vlm", expected, run, tolerance=0.05)
    assert len(lines) == 1 and lines[0].startswith("demo vlm: student_after 0.800, README 0.890 (off by 0.090")
    assert misses("vlm", expected, run, tolerance=0.1) == []


def test_the_spread_is_each_numbers_mean_and_its_largest_distance_from_it():
    runs = {"as is": {"teacher": 0.9, "student_before": 0.4, "student_after": 0.88},
            "toy seed 1": {"teacher": 0.9, "student_before": 0.3, "student_after": 0.80},
            "2 threads": {"teacher": 0.9, "student_before": 0.5, "student_after": 0.84}}
    rows = spread_rows("vlm", runs)
    assert rows[:3] == ["| vlm | as is | 0.900 | 0.400 | 0.880 |", "| vlm | toy seed 1 | 0.900 | 0.300 | 0.800 |",
                        "| vlm | 2 threads | 0.900 | 0.500 | 0.840 |"]
    assert rows[3] == "| vlm | **mean ± largest distance** | 0.900 ± 0.000 | 0.400 ± 0.100 | 0.840 ± 0.040 |"

"""A custom reward as a user would write one: loaded by file path in the tests
("tests/reward_plugin_example.py:graded_and_brief"), not imported as a module."""


def graded_and_brief(completion: str, sample: dict) -> dict:
    """Two named components: exact match of the gold answer, and a small bonus for brevity."""
    return {"exact": float(completion.strip() == sample["answer"]),
            "brevity": 0.1 if len(completion) <= sample.get("max_chars", 10) else 0.0}


def bad_name(completion: str, sample: dict) -> dict:
    return {"mean": 1.0}

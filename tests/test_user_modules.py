"""User-facing counts read as English ("1 token", not "1 tokens")."""

from braze.eval import format_table


def _row(tokens: int) -> dict:
    return {"variant": "fp", "executor": "reference", "perplexity": 2.0, "delta_pct": 0.0, "bits_per_weight": None,
            "seconds": 0.1, "tokens": tokens}


def test_eval_table_counts_tokens_in_english():
    assert format_table([_row(1)]).endswith("\n1 token")
    assert format_table([_row(64)]).endswith("\n64 tokens")

"""The metrics of the matrix: protocol ids never mixed, skipped network metrics."""

import pandas as pd
import pytest

from qvd_bench.errors import UserError
from qvd_bench.evaluate.metrics import check_metrics, check_protocols, load_weight_metrics


def test_comparing_across_protocol_ids_is_refused():
    rows = pd.DataFrame(
        {"metric": ["fvd", "fvd", "sqnr"], "protocol": ["fvd/a", "fvd/b", "fidelity/x0"]}
    )
    with pytest.raises(UserError, match="different protocol ids"):
        check_protocols(rows)
    check_protocols(rows.iloc[1:])


def test_fidelity_metrics_always_run_and_unknown_ones_are_refused():
    assert check_metrics(["fvd"]) == ("sqnr", "cosine", "psnr", "ssim", "fvd")
    with pytest.raises(UserError, match="did you mean 'fvd'"):
        check_metrics(["fdv"])


def test_a_network_metric_without_weights_is_skipped_with_a_notice():
    notices = []
    assert load_weight_metrics(["sqnr", "fid"], {}, notices) == []
    (notice,) = notices
    assert notice.startswith("fid skipped:") and notice.endswith("weights['fid']")

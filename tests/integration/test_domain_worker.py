"""The worker on the real CBIS-DDSM demo exam with the demo package (trained on synthetic
images): every view is flagged outside the model's validated domain, in the job's scores and in
the result objects, next to each score."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cadnode.config import Settings
from cadnode.jobs.db import Database
from cadnode.jobs.worker import Worker
from cadnode.results.common import OUTSIDE_DOMAIN
from tests.integration.test_worker import receive, run_study
from tests.unit.test_results_objects import _all_text


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Database]]:
    settings = Settings(home=tmp_path_factory.mktemp("home"))
    db = Database(settings.database_url)
    db.create_schema()
    yield settings, db
    db.dispose()


def test_demo_exam_is_flagged_everywhere(env: tuple[Settings, Database],
                                         demo_study: list[Path]) -> None:
    settings, db = env
    worker = Worker(settings, db)
    try:
        receive(db, settings, demo_study)
        study_uid = str(pydicom.dcmread(demo_study[0], stop_before_pixels=True).StudyInstanceUID)
        row = run_study(db, worker, study_uid)
    finally:
        worker.close()
    assert row["state"] == "done"
    flags = row["job"]["scores"]["outside_domain"]
    assert set(flags) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    for reasons in flags.values():
        assert "manufacturer not recorded" in reasons[0]
        assert any(r.startswith("a converted or digitised image") for r in reasons)
    out = settings.results_dir / study_uid
    (sr_path,) = out.glob("cad_sr.*.dcm")
    sr = _all_text(pydicom.dcmread(sr_path))
    for key, reasons in flags.items():
        assert f"{OUTSIDE_DOMAIN}: " + "; ".join(reasons) in sr, key
    (sc_path,) = out.glob("sc.*.dcm")
    comments = str(pydicom.dcmread(sc_path, stop_before_pixels=True).ImageComments)
    assert all(f"{key} {OUTSIDE_DOMAIN}: " in comments for key in flags)
    for kind in ("tid1500", "gsps"):
        (path,) = out.glob(f"{kind}.*.dcm")
        assert OUTSIDE_DOMAIN.upper() in _all_text(pydicom.dcmread(path)).upper(), kind

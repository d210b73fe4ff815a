"""Tests of the proposal abstracts catalog reader."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from astropy.utils.exceptions import AstropyUserWarning

from astrovl.datasets import raw_abstract_caption, read_abstracts
from astrovl.datasets.abstracts import ABSTRACT_COLUMNS, abstracts_by_proposal
from astrovl.exceptions import DatasetError

CATALOG = """\
Proposal ID: 5371
Cycle: 4
Title: HST Medium-Deep Survey: Cycle 4 medium
       low galactic latitude fields
PI: R. Griffiths
Category: Cosmology
Abstract:
We will obtain parallel WFPC2 images of random fields
to measure the sizes and shapes of faint galaxies.

A second paragraph: morphology versus redshift
is studied statistically.

----------------------------------------------------------------------

   proposal id :   5092
TITLE:   GTO Low Latitude Parallel Program
category: Stellar Populations
Abstract: Deep parallel images of the Galactic plane   trace
the stellar luminosity function.
pi: S. Groth
Cycle:4
======================================================================
Cycle: 20
Proposal ID: 12345
Title: White dwarfs in globular clusters
PI: A. Astronomer
Category: Stellar Physics
Proposal Category: GO
Abstract:
Cooling sequences of white dwarfs date the oldest stars.
"""


def test_parse_text_catalog_fields_and_multiline_abstracts():
    t = read_abstracts(CATALOG)
    assert t.colnames == list(ABSTRACT_COLUMNS)
    assert t["proposal_id"].dtype.kind == "i" and t["cycle"].dtype.kind == "i"
    assert list(t["proposal_id"]) == [5371, 5092, 12345]
    assert list(t["cycle"]) == [4, 4, 20]
    first = t[0]
    assert first["title"] == ("HST Medium-Deep Survey: Cycle 4 medium low galactic latitude "
                              "fields")
    assert first["pi"] == "R. Griffiths"
    assert first["category"] == "Cosmology"
    # hard-wrapped lines and paragraphs joined; "A second paragraph:" is text, not a field
    assert first["abstract"] == (
        "We will obtain parallel WFPC2 images of random fields to measure the sizes and shapes "
        "of faint galaxies. A second paragraph: morphology versus redshift is studied "
        "statistically.")
    second = t[1]  # fields out of order, odd case and spacing, abstract on the key line
    assert second["title"] == "GTO Low Latitude Parallel Program"
    assert second["pi"] == "S. Groth"
    assert second["category"] == "Stellar Populations"
    assert second["abstract"] == ("Deep parallel images of the Galactic plane trace the stellar "
                                  "luminosity function.")
    third = t[2]  # unknown field "Proposal Category" ignored, category not overwritten
    assert third["category"] == "Stellar Physics"
    assert third["abstract"] == "Cooling sequences of white dwarfs date the oldest stars."


def test_records_without_divider_and_file_input(tmp_path):
    text = ("Proposal ID: 1\nCycle: 1\nTitle: A\nPI: P\nCategory: Galaxies\nAbstract:\nFirst.\n"
            "\nProposal ID: 2\nCycle: 2\nTitle: B\nPI: Q\nCategory: Planets\nAbstract:\nSecond.\n")
    path = tmp_path / "abstracts.txt"
    path.write_text(text)
    t = read_abstracts(path)
    assert list(t["proposal_id"]) == [1, 2]
    assert list(t["abstract"]) == ["First.", "Second."]
    assert list(t["category"]) == ["Galaxies", "Planets"]
    assert read_abstracts(str(path))["title"][1] == "B"


def test_malformed_record_warns_and_is_skipped():
    text = CATALOG + "\n-----\nTitle: no id here\nAbstract:\nlost text\n"
    with pytest.warns(AstropyUserWarning, match="no usable proposal ID"):
        t = read_abstracts(text)
    assert list(t["proposal_id"]) == [5371, 5092, 12345]
    assert "lost text" not in " ".join(t["abstract"])


def test_duplicate_ids_keep_first_with_abstract():
    text = ("Proposal ID: 7\nTitle: empty\nAbstract:\n\n-----\n"
            "Proposal ID: 7\nTitle: full\nAbstract:\nSome text.\n-----\n"
            "Proposal ID: 7\nTitle: later\nAbstract:\nOther text.\n")
    with pytest.warns(AstropyUserWarning, match="more than once"):
        t = read_abstracts(text)
    assert len(t) == 1 and t["title"][0] == "full" and t["cycle"][0] == -1


def test_no_records_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("nothing to see\n\n-----\n")
    with pytest.raises(DatasetError, match="no proposal records"):
        read_abstracts(path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_abstracts(tmp_path / "missing.txt")


@pytest.mark.parametrize("fmt,suffix", [("ascii.ecsv", ".ecsv"), ("ascii.csv", ".csv")])
def test_table_files_round_trip(tmp_path, fmt, suffix):
    t = read_abstracts(CATALOG)
    path = tmp_path / f"abstracts{suffix}"
    t.write(path, format=fmt)
    back = read_abstracts(path)
    assert list(back["proposal_id"]) == [5371, 5092, 12345]
    assert list(back["abstract"]) == list(t["abstract"])
    assert back["cycle"].dtype.kind == "i"


def test_table_input_minimal_and_missing_columns():
    t = read_abstracts(Table({"proposal_id": ["17", "18"], "abstract": ["a  b", "c"]}))
    assert list(t["proposal_id"]) == [17, 18]
    assert list(t["cycle"]) == [-1, -1]
    assert list(t["abstract"]) == ["a b", "c"]
    assert list(t["title"]) == ["", ""]
    with pytest.raises(DatasetError, match="abstract"):
        read_abstracts(Table({"proposal_id": [1]}))
    with pytest.raises(DatasetError, match="not an integer"):
        read_abstracts(Table({"proposal_id": ["x"], "abstract": ["t"]}))


def test_abstracts_by_proposal():
    recs = abstracts_by_proposal(read_abstracts(CATALOG))
    assert set(recs) == {5371, 5092, 12345}
    assert recs[12345]["cycle"] == 20 and isinstance(recs[12345]["cycle"], int)


def test_raw_abstract_caption():
    assert raw_abstract_caption("Galaxies", " We  study\nmergers. ") == (
        "Category: Galaxies. We study mergers.")
    assert raw_abstract_caption("Stellar Physics.", "X.") == "Category: Stellar Physics. X."
    assert raw_abstract_caption("", "Only text.") == "Only text."
    t = read_abstracts(CATALOG)
    cap = raw_abstract_caption(t["category"][2], t["abstract"][2])
    assert cap.startswith("Category: Stellar Physics. Cooling")
    assert np.char.startswith(cap, "Category:")


def test_field_names_inside_an_abstract_stay_text():
    text = ("Proposal ID: 3\nTitle: Set already\nCategory: Planets\nAbstract:\nWe map storms.\n"
            "Title: of this paragraph is not a field, the title is set.\nMore text.\n")
    t = read_abstracts(text)
    assert len(t) == 1 and t["title"][0] == "Set already"
    assert t["abstract"][0] == ("We map storms. Title: of this paragraph is not a field, the "
                                "title is set. More text.")

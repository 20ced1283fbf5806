"""Convert SMPL model files from the original download (chumpy pickles) to plain numpy pickles, without chumpy.

    python -m data_prep.convert_smpl_pkl --out data/body \\
        --neutral SMPL_python_v.1.1.0/smpl/models/basicmodel_neutral_lbs_10_207_0_v1.1.0.pkl \\
        --male    SMPL_python_v.1.1.0/smpl/models/basicmodel_m_lbs_10_207_0_v1.1.0.pkl \\
        --female  SMPL_python_v.1.1.0/smpl/models/basicmodel_f_lbs_10_207_0_v1.1.0.pkl

writes <out>/smpl/SMPL_{NEUTRAL,MALE,FEMALE}.pkl, the layout `body_model_dir` expects (docs/body.md). The source
pickles are read with a restricted unpickler that maps every chumpy class to a stub keeping the pickled state;
a stored chumpy array (chumpy.ch.Ch) keeps its value in the state's 'x', which becomes a float64 ndarray.
Nothing from chumpy (or anything else outside numpy/scipy.sparse) is imported or run.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from data_prep.converters_common import load_pickle, log

REQUIRED = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


class ChumpyStub:
    """Stands in for any chumpy class while unpickling; keeps the state that pickle hands to __setstate__."""

    def __setstate__(self, state):
        self.state = state


def to_numpy(value, key: str):
    if not isinstance(value, ChumpyStub):
        return value
    state = value.state if isinstance(value.state, dict) else {}
    if state.get("x") is None:
        raise ValueError(f"'{key}' is a derived chumpy expression (state keys {sorted(state)}), not a stored array; "
                         "convert this file in an environment with chumpy (smplx's tools/clean_ch.py)")
    return np.asarray(state["x"], dtype=np.float64)


def convert_file(src: str | Path, dst: str | Path) -> dict:
    """One SMPL pickle, chumpy or not -> a plain pickle at `dst`; returns the converted dict."""
    data = load_pickle(src, stubs={"chumpy": ChumpyStub}, encoding="latin1")
    if not isinstance(data, dict):
        raise ValueError(f"{src} holds a {type(data).__name__}, not an SMPL model dict")
    data = {k: to_numpy(v, k) for k, v in data.items()}
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{src} is missing SMPL keys {missing}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("wb") as fh:
        pickle.dump(data, fh, protocol=4)
    log(f"{src} -> {dst}")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="body model folder; files go to OUT/smpl/SMPL_<GENDER>.pkl")
    for g in ("neutral", "male", "female"):
        ap.add_argument(f"--{g}", help=f"source pickle of the {g} model")
    a = ap.parse_args(argv)
    todo = {g: getattr(a, g) for g in ("neutral", "male", "female") if getattr(a, g)}
    if not todo:
        ap.error("give at least one of --neutral, --male, --female")
    for g, src in todo.items():
        convert_file(src, Path(a.out) / "smpl" / f"SMPL_{g.upper()}.pkl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

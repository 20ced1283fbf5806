"""Write phalp_like.joblib{,.z}: a tiny dict in joblib's on-disk format, for tests of data_prep's joblib reader.

    pip install --target /tmp/jl joblib && PYTHONPATH=/tmp/jl python tests/assets/make_joblib_fixture.py

`expected()` builds the same dict without joblib; tests compare what the reader loads against it.
joblib version used for the committed files: 1.6.0 (pickle protocol 5; the uncompressed file carries
joblib >= 1.2's array alignment padding, the .z file is zlib at level 3, as PHALP writes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def expected() -> dict:
    rng = np.random.default_rng(0)
    frame = {
        "time": 3, "shot": 0, "frame_path": "outputs/_DEMO/clip/img/000004.jpg", "tid": [1, 2],
        "tracked_time": [0, 1], "size": [[64, 96], [64, 96]],
        "camera": [rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)],
        "smpl": [{"global_orient": rng.normal(size=(1, 3, 3)).astype(np.float32),
                  "body_pose": rng.normal(size=(23, 3, 3)).astype(np.float32),
                  "betas": rng.normal(size=10).astype(np.float32)}],
        "class_name": [np.int64(0)], "conf": [np.float32(0.9)],
    }
    return {
        "frame": frame,
        "fortran": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">i4"),
        "scalar_array": np.array(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "objects": np.array([{"a": 1}, "text", None], dtype=object),
        "mask_rle": {"size": [64, 96], "counts": "abc123"},
    }


def main() -> None:
    import joblib

    here = Path(__file__).parent
    joblib.dump(expected(), here / "phalp_like.joblib")
    joblib.dump(expected(), here / "phalp_like.joblib.z", compress=3)
    print("joblib", joblib.__version__)


if __name__ == "__main__":
    main()

"""4D-Humans / PHALP tracking output + its source video -> contract shards (docs/data_prep.md).

    python -m data_prep.convert_phalp --phalp outputs/results/demo_video.pkl --video video.mp4 --out shards/ \
        --min-frames 17 [--multi] [--license CC-BY-4.0]

PHALP writes one joblib pickle per video: frame name -> {'time': t, 'tid': [...], 'tracked_time': [...],
'smpl': [{'global_orient' (1,3,3), 'body_pose' (23,3,3), 'betas' (10,)}], 'camera': [(3,)], 'size': [[H, W]], ...},
one list entry per confirmed track. Only detections with tracked_time == 0 are used: the other entries are
"ghosts" that repeat a lost track's last observation.

Camera (PHALP's HMAR.get_3d_parameters with 4D-Humans' HMR2 head): the frame is padded to a centred square of
side S = max(H, W) (padding top = (S-H)//2, left = (S-W)//2) and seen at 256 px by a pinhole with focal 5000 and
principal point at the square's centre. `camera` is the translation pred_cam_t of that camera, whose axes are
OpenCV's (x right, y down, z forward), and the body is SMPL(theta, beta) without translation, posed with rotation
matrices, directly in that camera frame: global_orient already includes the half turn about x that stands SMPL's
y-up body upright in the y-down camera (4D-Humans flips only for its OpenGL renderer). In this frame's own pixels
(pixel centres at integers, docs/data_format.md):

    K = [[f, 0, S/2 - left - 1/2], [0, f, S/2 - top - 1/2], [0, 0, 1]],  f = 5000 / 256 * S
    w2c = I (the world is the camera frame), global_orient = log(R_go), body_pose = log(R_j)
    transl = cam_t + J0(beta_t) - J0(mean beta)

The -1/2 converts from the corner convention of PHALP's crops and renderer. SMPL rotates global_orient about the
pelvis J0(beta), which it leaves in place, so SMPL(theta, beta, transl=cam_t) == SMPL(theta, beta) + cam_t; the
J0 term keeps the pelvis where it was when a track's per-frame betas are replaced by their mean (zero without
--body-model-dir, or when the betas are constant).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.converters_common import (INPUT_ERRORS, FrameSource, PelvisModel, ShardSink, check_lengths,
                                         load_pickle, log, rotmat_to_axis_angle, runs, sanitize_key, split_run)
from isa4d.data.contract import CameraSequence, SMPLSequence, encode_sample
from isa4d.geometry.camera import CropResize

SOURCE = "4d-humans-phalp"
FOCAL_LENGTH, CROP_SIZE = 5000.0, 256  # HMR2 / PHALP cfg.EXTRA.FOCAL_LENGTH on a cfg.render.res square crop


def phalp_intrinsics(height: int, width: int) -> np.ndarray:
    """K (3, 3) of PHALP's camera in the pixels of an (height, width) frame, pixel centres at integers."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    f = FOCAL_LENGTH / CROP_SIZE * side
    return np.array([[f, 0.0, side / 2 - left - 0.5], [0.0, f, side / 2 - top - 0.5], [0.0, 0.0, 1.0]])


@dataclass
class Detection:
    global_orient: np.ndarray  # (3,) axis-angle
    body_pose: np.ndarray  # (69,)
    betas: np.ndarray  # (10,)
    cam_t: np.ndarray  # (3,)
    size: tuple[int, int]  # (H, W) of the frame PHALP saw


def _rotations(x, count: int, what: str) -> np.ndarray:
    """count rotations given as matrices (count,3,3) or axis-angle (count*3,) -> (count*3,) axis-angle."""
    a = np.asarray(x, dtype=np.float64)
    if a.size == count * 9:
        return rotmat_to_axis_angle(a.reshape(count, 3, 3)).reshape(-1)
    if a.size == count * 3:
        return a.reshape(-1)
    raise ValueError(f"PHALP smpl '{what}' has shape {a.shape}; expected {count} rotation matrices or axis-angles")


def read_tracks(results: Mapping) -> tuple[list[int], dict[int, dict[int, Detection]]]:
    """PHALP results -> (every frame time from first to last, {track id: {time: Detection}}) of observed detections."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("PHALP results must be a non-empty dict of frame name -> frame data")
    frames = list(results.values())
    times = [int(fr.get("time", i)) for i, fr in enumerate(frames)]
    if len(set(times)) != len(times):
        raise ValueError("PHALP results hold two frames with the same 'time'")
    tracks: dict[int, dict[int, Detection]] = {}
    for t, fr in sorted(zip(times, frames), key=lambda x: x[0]):
        tids = list(fr.get("tid", []))
        lost = list(fr.get("tracked_time", [0] * len(tids)))
        for i, tid in enumerate(tids):
            if lost[i] != 0:
                continue
            smpl = fr["smpl"][i]
            tracks.setdefault(int(tid), {})[t] = Detection(
                global_orient=_rotations(smpl["global_orient"], 1, "global_orient"),
                body_pose=_rotations(smpl["body_pose"], 23, "body_pose"),
                betas=np.asarray(smpl["betas"], dtype=np.float64).reshape(-1)[:10],
                cam_t=np.asarray(fr["camera"][i], dtype=np.float64).reshape(3),
                size=tuple(int(s) for s in np.asarray(fr["size"][i]).reshape(-1)[:2]),
            )
    return list(range(min(times), max(times) + 1)), tracks  # a missing frame breaks every run


def frame_names(results: Mapping) -> dict[int, str]:
    """PHALP time -> the file name of the frame PHALP read (the results' keys are its frame paths)."""
    times = [int(fr.get("time", i)) if isinstance(fr, Mapping) else i for i, fr in enumerate(results.values())]
    return {t: Path(key).name for t, key in zip(times, results) if isinstance(key, str)}


def check_frame_names(results: Mapping, source: FrameSource, frame_offset: int) -> None:
    """In a frame folder, PHALP's time t must be the file PHALP named for it (`{t+1:06d}.jpg` when PHALP extracted
    the frames): a different file means another folder, or a wrong --frame-offset."""
    for t, name in sorted(frame_names(results).items()):
        path = source.files.get(t + frame_offset)
        if path is not None and path.name != name:
            raise ValueError(f"PHALP time {t} is frame {name}, but file {t + frame_offset} of {source.path} (sorted "
                             f"*.jpg, + --frame-offset {frame_offset}) is {path.name}: not the folder PHALP read, or "
                             "a wrong --frame-offset")


def clips(times: Sequence[int], tracks: Mapping[int, Mapping[int, Detection]], *, multi: bool, min_frames: int,
          max_frames: int | None) -> list[tuple[tuple[int, ...], list[int]]]:
    """(track ids, frame times) of each clip: per track, or (multi) per run of frames with the same visible tracks.

    A run is a maximal span of consecutive frames; one shorter than `min_frames` is skipped with a message, a longer
    one is cut into pieces of at most `max_frames`. In multi mode, tracks observed on fewer than `min_frames` frames
    in all are ignored first, so a flickering false detection does not cut everyone's clip.
    """
    if multi:
        short = [tid for tid, d in tracks.items() if len(d) < min_frames]
        for tid in short:
            log(f"track {tid}: observed on {len(tracks[tid])} frames, fewer than --min-frames {min_frames}: ignored")
        kept = {tid: d for tid, d in tracks.items() if tid not in short}
        labels = [tuple(sorted(tid for tid, d in kept.items() if t in d)) for t in times]
        groups = [(None, labels)]
    else:
        groups = [(tid, [(tid,) if t in d else () for t in times]) for tid, d in sorted(tracks.items())]
    out = []
    for _, labels in groups:
        for start, stop, tids in runs(labels):
            if stop - start < min_frames:
                who = f"track {tids[0]}" if len(tids) == 1 and not multi else f"tracks {list(tids)}"
                log(f"{who}: frames {times[start]}-{times[stop - 1]} ({stop - start} frames) shorter than "
                    f"--min-frames {min_frames}: skipped")
                continue
            out += [(tids, list(times[a:b])) for a, b in split_run(start, stop, max_frames)]
    return out


def build_sample(key: str, tids: Sequence[int], frame_times: Sequence[int], tracks, source: FrameSource, *,
                 frame_offset: int, meta: dict, pelvis: PelvisModel | None) -> dict:
    """One contract sample: the given tracks over the given (consecutive) PHALP frame times."""
    dets = [[tracks[tid][t] for t in frame_times] for tid in tids]  # (P, F)
    go = np.array([[d.global_orient for d in row] for row in dets])  # (P, F, 3)
    bp = np.array([[d.body_pose for d in row] for row in dets])  # (P, F, 69)
    betas_t = np.array([[d.betas for d in row] for row in dets])  # (P, F, 10)
    transl = np.array([[d.cam_t for d in row] for row in dets])  # (P, F, 3)
    betas = betas_t.mean(axis=1)  # (P, 10)
    if pelvis is not None:
        transl = transl + pelvis(betas_t) - pelvis(betas)[:, None]
    K = np.stack([_frame_K(dets[0][i].size, source) for i in range(len(frame_times))])  # (F, 3, 3)
    indices = [t + frame_offset for t in frame_times]
    missing = [i for i in indices if not source.has(i)]
    if missing:
        raise ValueError(f"PHALP frame {missing[0] - frame_offset} (+ --frame-offset {frame_offset}) is not in "
                         f"{source.path} ({source.num_frames} frames): wrong --video or --frame-offset?")
    smpl = SMPLSequence(*(x.astype(np.float32) for x in (betas, go, bp, transl)))
    cam = CameraSequence(K.astype(np.float32), np.repeat(np.eye(4, dtype=np.float32)[None], len(frame_times), 0))
    meta = dict(meta, track_ids=[int(t) for t in tids], source_frames=[indices[0], indices[-1] + 1])
    return encode_sample(key, source.read(indices), smpl, cam, meta)


def _frame_K(size: tuple[int, int], source: FrameSource) -> np.ndarray:
    """PHALP's K for a frame of `size`, mapped to the video's pixels (if it was resized since) and the output crop."""
    h, w = size
    K = phalp_intrinsics(h, w)
    if (h, w) != (source.height, source.width):
        if abs(h / w - source.height / source.width) > 0.01:
            turned = source.rotation % 180 and abs(h / w - source.width / source.height) <= 0.01
            why = (f"{source.path} is stored {source.width}x{source.height} and shown rotated by "
                   f"{source.rotation} degrees: PHALP read it without applying the rotation; re-encode it upright "
                   "or rerun PHALP on the rotated frames" if turned else "not the same video")
            raise ValueError(f"PHALP saw {h}x{w} frames but {source.path} is {source.height}x{source.width} as "
                             f"displayed: {why}")
        K = CropResize(h, w, source.height, source.width, 0, 0, source.height, source.width).apply_to_K(K)
    return source.crop.apply_to_K(K)


def convert(phalp: str | Path, video: str | Path, out: str | Path, *, min_frames: int = 17,
            max_frames: int | None = 300, multi: bool = False, fps: float | None = None, frame_offset: int = 0,
            max_side: int | None = None, gender: str = "neutral", license: str = "unknown", subject: str | None = None,
            prefix: str | None = None, per_shard: int = 64, overwrite: bool = False,
            body_model_dir: str | None = None) -> list[str]:
    """Convert one PHALP results file and its source video; returns the written shard paths."""
    check_lengths(min_frames, max_frames)
    results = load_pickle(phalp)
    times, tracks = read_tracks(results)
    # A frame folder is indexed as PHALP indexes it: time t is the t-th of its sorted *.jpg files
    source = FrameSource(video, fps=fps, max_side=max_side, by_position=True, suffixes=(".jpg",))
    if source.data is None:
        check_frame_names(results, source, frame_offset)
    subject = sanitize_key(subject or Path(video).stem)
    pelvis = PelvisModel(body_model_dir, gender) if body_model_dir else None
    meta = {"fps": source.fps, "gender": gender, "subject": subject, "source": SOURCE, "license": license,
            "source_video": Path(video).name}
    todo = clips(times, tracks, multi=multi, min_frames=min_frames, max_frames=max_frames)
    with ShardSink(out, prefix or f"phalp-{subject}", per_shard, overwrite) as sink:
        for tids, frame_times in todo:
            name = "multi" if multi else f"t{tids[0]}"
            key = f"{subject}_{name}_{frame_times[0] + frame_offset:06d}"
            sink.write(build_sample(key, tids, frame_times, tracks, source, frame_offset=frame_offset,
                                    meta=dict(meta, subject=subject if multi else f"{subject}_t{tids[0]}"),
                                    pelvis=pelvis))
    log(f"wrote {len(sink.keys)} samples from {len(tracks)} tracks to {len(sink.paths)} shard(s) in {out}")
    return sink.paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phalp", required=True, help="PHALP / 4D-Humans results file (outputs/results/*.pkl)")
    ap.add_argument("--video", required=True, help="the video PHALP tracked: an mp4 or a folder of frames")
    ap.add_argument("--out", required=True, help="output folder for the shards")
    ap.add_argument("--min-frames", type=int, default=17, help="drop clips shorter than this")
    ap.add_argument("--max-frames", type=int, default=300,
                    help="cut longer clips into pieces of at most this (0: no limit)")
    ap.add_argument("--multi", action="store_true", help="one sample per run of frames with the same visible tracks, "
                    "all of them in it (default: one sample per track)")
    ap.add_argument("--fps", type=float, help="frame rate (default: the video's; required for a frame folder)")
    ap.add_argument("--frame-offset", type=int, default=0, help="video frame index of PHALP time 0 "
                    "(PHALP's video.start_frame, if you set it)")
    ap.add_argument("--max-side", type=int, default=0, help="downscale so the long side is at most this (0: keep)")
    ap.add_argument("--gender", default="neutral", choices=["neutral", "male", "female"],
                    help="body model the fits use (4D-Humans: neutral)")
    ap.add_argument("--license", default="unknown", help="license of the source video, recorded in each sample")
    ap.add_argument("--subject", help="name used in sample keys (default: the video's file name)")
    ap.add_argument("--prefix", help="shard file prefix (default: phalp-<subject>)")
    ap.add_argument("--per-shard", type=int, default=64, help="samples per shard")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    ap.add_argument("--body-model-dir", help="SMPL model folder; if given, the pelvis is kept in place when "
                    "per-frame betas are averaged")
    a = ap.parse_args(argv)
    try:
        paths = convert(a.phalp, a.video, a.out, min_frames=a.min_frames, max_frames=a.max_frames or None,
                        multi=a.multi, fps=a.fps, frame_offset=a.frame_offset, max_side=a.max_side or None,
                        gender=a.gender, license=a.license, subject=a.subject, prefix=a.prefix,
                        per_shard=a.per_shard, overwrite=a.overwrite, body_model_dir=a.body_model_dir)
    except INPUT_ERRORS as e:
        log(f"error: {e}")
        return 2
    print("\n".join(paths))
    return 0 if paths else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The procedural 4D human world: toy SMPL bodies with procedural identities and motions, rendered in
procedural rooms by moving cameras, written as contract shards (docs/toy_world.md).

    python -m data_prep.toy_world --out data/toy --preset {tiny,default,large} [--seed 0]
"""

"""`isa4d predict` is not a command (VAEModule has no predict step; stage 2's is `isa4d sample`): it says so in one
line and exits 2, instead of failing inside Lightning ("requires forward") or writing nothing."""

from isa4d.cli import main


def test_predict_points_to_sample(capsys):
    assert main(["predict", "-c", "configs/vae/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no `predict` command" in err and "isa4d sample" in err and err.count("\n") == 1

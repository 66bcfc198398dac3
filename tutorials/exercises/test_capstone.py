"""The capstone: your D3PO loss (exercises.d3po_loss) trains the toy model inside the real d3po.py, and must raise
its objective, the shape area on noise held apart from training, by more than twice the standard error of the
rise. About a minute on two CPU cores."""
import pytest

from plumbing import bookkeeping
import d3po
from toy_model.measure import load_trained, measure, paired_se   # the toy world's held-apart measurement

EPOCHS, IMAGES_PER_PROMPT = 3, 4


@pytest.mark.points("9. Capstone: your D3PO loss trains the toy model", 5)
def test_your_d3po_loss_raises_the_toy_objective(ex, tmp_path, monkeypatch, capsys, record_property):
    project_loss = d3po.d3po_loss

    def your_loss(log_probs, ref_log_probs, beta, ratio_clip):
        loss = ex.d3po_loss(log_probs, ref_log_probs, beta, ratio_clip)
        # what the script logs beside the loss (accuracy, clipfrac) comes from its own function
        return loss, project_loss(log_probs.detach(), ref_log_probs, beta, ratio_clip)[1]
    monkeypatch.setattr(d3po, "d3po_loss", your_loss)
    argv = ["--model", "toy", "--device", "cpu", "--num-epochs", str(EPOCHS), "--output-dir", str(tmp_path / "run")]
    d3po.main(argv)
    args = bookkeeping.parse_args(d3po.Args, argv, presets=d3po.PRESETS)
    prompts = bookkeeping.load_prompts(args.prompt_file)
    before, _ = measure(load_trained(args), args, prompts, IMAGES_PER_PROMPT)
    after, _ = measure(load_trained(args, args.output_dir), args, prompts, IMAGES_PER_PROMPT)
    rise, se = after["area"] - before["area"], paired_se(before, after, "area")
    record_property("area_rise", round(rise, 2))
    record_property("standard_error", round(se, 2))
    with capsys.disabled():
        print(f"\ncapstone: shape area {before['area']:.1f} -> {after['area']:.1f}% of the image on held-apart noise, "
              f"a rise of {rise:+.1f} +- {se:.1f} (standard error) after {EPOCHS} epochs of your D3PO loss")
    assert rise > 2 * se, f"the shape area rose by {rise:+.2f}, not more than twice its standard error {se:.2f}: " \
                          f"your loss does not train the model to prefer the winners"

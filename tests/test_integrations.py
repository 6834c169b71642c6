"""CAME inside Hugging Face's Trainer and Lightning's Trainer (skipped where those are not installed: they are
not test dependencies). Checked by hand with transformers 4.57.1 (accelerate 1.10.1) and lightning 2.5.5."""
import pytest
import torch

import came_kernels


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.randn(8, generator=torch.Generator().manual_seed(i))
        return {"x": x, "labels": int(x.sum() > 0)}


def _assert_trained(opt, weight, before, steps):
    assert {float(s["step"]) for s in opt.state.values()} == {float(steps)}
    assert not torch.equal(before, weight.detach()), "the params did not change"


def test_hugging_face_trainer_takes_came_and_a_scheduler(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(8, 2)

        def forward(self, x, labels=None):
            logits = self.l(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    model = Tiny()
    before = model.l.weight.detach().clone()
    opt = came_kernels.CAME(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=10,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched)).train()
    _assert_trained(opt, model.l.weight, before, 10)


def test_lightning_configure_optimizers_returns_came():
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(8, 2)

        def training_step(self, batch, i):
            return torch.nn.functional.cross_entropy(self.l(batch["x"]), batch["labels"])

        def configure_optimizers(self):
            return came_kernels.CAME(self.parameters(), lr=1e-2)

    module = Module()
    before = module.l.weight.detach().clone()
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Data(), batch_size=8))
    _assert_trained(trainer.optimizers[0], module.l.weight, before, 10)

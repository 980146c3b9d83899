"""Fine-tune a sequence classifier on SST-2 (full, LoRA or QLoRA); validation accuracy at every evaluation.

    python recipes/finetune_sentiment.py                                    # MiniLM + LoRA, one process
    torchrun --nproc_per_node 2 recipes/finetune_sentiment.py ds_config=ds_configs/zero2.json peft=none
    torchrun --nproc_per_node 8 recipes/finetune_sentiment.py model.name_or_path=Qwen/Qwen2.5-0.5B \\
        data.train=stanfordnlp/sst2 data.validation=stanfordnlp/sst2 fsdp=full_shard peft=lora

Encoders and decoders both load as AutoModelForSequenceClassification. Every setting is in
configs/finetune_sentiment.yaml; <run_dir>/summary.json holds val_accuracy.
"""
from pathlib import Path

from zerokit.data.tasks import SentimentTask
from zerokit.finetuning import finetune
from zerokit.recipe import run_recipe


def main(cfg):
    d = cfg.data

    def make_task(tokenizer, encoder_decoder):
        return SentimentTask(tokenizer, d.train, d.validation, max_length=d.max_length, text_column=d.text_column,
                             label_column=d.label_column, num_labels=d.num_labels, eval_batch_size=d.eval_batch_size)

    def report(s):
        print(f"\nval_accuracy {100 * s['val_accuracy']:.2f}%  val_loss {s['val_loss']:.4f}  "
              f"{s['train_seconds']:.0f} s of training  ({cfg.run_dir})\n")

    return finetune(cfg, "seq_cls", make_task, num_labels=d.num_labels, on_summary=report)


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, Path(__file__).parent / "configs" / "finetune_sentiment.yaml", __doc__.split("\n")[0]))

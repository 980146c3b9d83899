"""Fine-tune a language model to summarise dialogues (DialogSum): SFT with the loss on summary tokens only;
evaluation generates summaries for the validation split and scores ROUGE-1/2/L.

    python recipes/finetune_summarization.py           # the offline MiniLM base, warm-started on first use
    torchrun --nproc_per_node 2 recipes/finetune_summarization.py ds_config=ds_configs/zero3.json peft=lora
    zerokit train finetune_summarization model.name_or_path=facebook/bart-base   # wherever zerokit is installed

Decoder-only models train on prompt_template(dialogue) + " " + summary + eos; encoder-decoder models
(BART, T5) on dialogue -> summary. Every setting is in configs/finetune_summarization.yaml;
<run_dir>/summary.json holds rouge1, rouge2, rougeL (percent), predictions.jsonl the generated summaries.
"""
from pathlib import Path

from zerokit.data.tasks import SummarizationTask
from zerokit.finetuning import finetune
from zerokit.recipe import cached_warm_start, run_recipe


def main(cfg):
    d, e = cfg.data, cfg.eval
    # The default base, warm-start:minilm, is the MiniLM encoder made a causal LM, written to the cache once.
    cfg.model.name_or_path = cached_warm_start(cfg.model.name_or_path, Path.home() / ".cache" / "zerokit")

    def make_task(tokenizer, encoder_decoder):
        return SummarizationTask(tokenizer, d.train, d.validation, max_length=d.max_length,
                                 max_target_length=d.max_target_length, prompt_template=d.prompt_template,
                                 dialogue_column=d.dialogue_column, summary_column=d.summary_column,
                                 encoder_decoder=encoder_decoder, max_eval_samples=e.max_samples,
                                 eval_batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, strategy=e.strategy,
                                 num_beams=e.num_beams, predictions_path=Path(cfg.run_dir) / "predictions.jsonl",
                                 no_repeat_ngram_size=e.no_repeat_ngram_size, repetition_penalty=e.repetition_penalty,
                                 length_penalty=e.length_penalty)

    def report(s):
        print(f"\nROUGE-1 {s['rouge1']:.2f}  ROUGE-2 {s['rouge2']:.2f}  ROUGE-L {s['rougeL']:.2f}  "
              f"val_loss {s['val_loss']:.4f}  {s['train_seconds']:.0f} s of training  ({cfg.run_dir})\n")

    return finetune(cfg, "causal_lm", make_task, on_summary=report)


if __name__ == "__main__":
    raise SystemExit(run_recipe(main, Path(__file__).parent / "configs" / "finetune_summarization.yaml", __doc__.split("\n")[0]))

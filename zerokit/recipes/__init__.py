"""The recipes: readable training scripts, each with its YAML in configs/. Run one as a script
(`accelerate launch recipes/pretrain_gpt.py ...` from the repository, where `recipes/` links here)
or as `zerokit train pretrain_gpt ...` wherever zerokit is installed."""

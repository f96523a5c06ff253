import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.integrations.transformers import EntropyTrainerCallback

model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
tokens = torch.randint(0, 64, (64, 32))  # random tokens: no download
data = [{"input_ids": t, "labels": t} for t in tokens]
args = TrainingArguments("hf_out", max_steps=20, logging_steps=5, use_cpu=True, report_to="none")
trainer = Trainer(model=model, args=args, train_dataset=data)
EntropyTrainerCallback([AttentionEntropyMonitor()]).attach(trainer)  # before report_to backends
trainer.train()  # logs entropy/attn_norm/min, entropy/attn/L{l}/H{h}, ... every 5 steps; prints a summary

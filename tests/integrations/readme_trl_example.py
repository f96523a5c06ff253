from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig
from entrotrain.integrations.trl import EntrotrainGRPOTrainer
from entrotrain.regularizers.policy_loss import ClipCovLoss
vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("0123456789+=")}}  # one token per character
tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.Split(Regex("."), behavior="isolated"), decoders.Fuse()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1))
def reward(completions, prompts, **kwargs):  # 1 when the completion starts with the sum
    return [float(c.startswith(str(int(p[0]) + int(p[2])))) for p, c in zip(prompts, completions)]
args = GRPOConfig(output_dir="grpo_out", use_cpu=True, bf16=False, report_to="none", num_generations=4,
                  max_completion_length=16, max_steps=10, logging_steps=2, learning_rate=1e-2)
trainer = EntrotrainGRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
    train_dataset=Dataset.from_dict({"prompt": [f"{i % 5}+{i // 5 % 5}=" for i in range(64)]}),
    policy_loss=ClipCovLoss(clip_ratio=0.02, cov_lb=0.0, agg="seq-mean-token-mean"))  # Clip-Cov via entrotrain
trainer.train()  # logs entropy/policy/... every 2 steps; prints first/last entropy, covariance, reward at the end

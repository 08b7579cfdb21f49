"""R2Rank: RL training of an LLM and its scoring head (Algorithm 1 of the R2Rank paper), and main,
which runs any stage (the flags: machinery/config.py).

    python r2rank.py --stage rl --model tiny            # runs anywhere, no download
    python r2rank.py --stage rl --data data/ml100k --model Qwen/Qwen2.5-1.5B-Instruct
    torchrun --nproc-per-node 4 r2rank.py --stage rl ...   # the step's users split over 4 GPUs (machinery/distributed.py)

One RL step (train_rl), tagged with Algorithm 1's lines:
    1) rollout: one reasoning trace y_k per candidate, from the self-check prompt   lines 1-3, Eq. 1
    2) scores s_k = f_phi(h_k), h_k the last hidden state at the trace's end         line 4, Eq. 2
    3) S rankings tau ~ Plackett-Luce(s), reward rho(tau) = NDCG@10                  lines 6-7, Eq. 4
    4) clipped PPO on the tokens and the score path into theta, REINFORCE on phi    lines 8-12, Eqs. 5-6
    5) log, validate, checkpoint

The log line (and metrics.jsonl): reward (mean NDCG@reward-k of the S rankings) and reward_std (its
spread over a user's rankings: REINFORCE's signal); ndcg@10_greedy (the step's training users: the
ranking that sorts the scores of their sampled traces, Plackett-Luce's most likely one; "greedy" is the
ranking, not the traces); valid_ndcg@10 (--eval-every: validation users, greedy traces, the scores
sorted; what evaluation reports); score_std (the spread of a user's K scores); head_loss;
ppo_loss, ratio (mean token ratio of the PPO epochs), response_len (a trace's mean length in tokens), step_time. Its health signs: answer_share and truncated_share (traces that reach an <answer>, or are
cut at the token limit); distinct_share and token_logp (fall towards 1/K and 0 when the policy writes
one text for every candidate); signal_share (users whose S rankings differ in reward: the head learns
only from those); clip_frac, approx_kl; decode_logp_gap (the mean |decode-time - update log-prob| per
token), decode_logp_gap_max (the largest over the step's tokens: one token decoded wrongly shows here
first) and decode_score_gap (the largest |decode-time - update score|: the update reads h_k where the rollout did);
advantage_abs and advantage_nonzero (the mean |advantage| and the share of traces with one).

Where this departs from the paper: the one numbered list, which every module cites by number (defaults
are the paper's unless said; details where implemented). The RL stage (1-11):
1. S rankings per user instead of one (--num-rankings 8): sampling one costs nothing next to K traces.
2. A leave-one-out baseline over the S rankings in the head's REINFORCE (--baseline, on; ppo.py).
3. --advantage batch or counterfactual adds a baseline to Eq. 6's advantage, unbiased (ppo.py).
4. The PPO loss is a per-token mean, not Eq. 6's plain sum (ppo.clipped_token_loss).
5. theta_old is the first PPO epoch's own forward, not the decoding pass (rollout.ppo_update).
6. Log-probs at the sampling temperature (rollout.py); RL refuses --temperature 0 and --top-p < 1
   (machinery/config.py).
7. The head's gradient reaches the LLM through h_k too (--score-path, on). Sec. 3.3 asks for the
   gradient to flow from rho(tau) to theta via tau, s_k and y_k; with s_k = f_phi(h_k(theta, y_k))
   grad_theta J = E[sum_k A_k grad log pi(y_k)] (Eq. 6, the tokens) + E[sum_k dV/ds_k grad_theta s_k],
   V(s) = E_{tau ~ PL(s)} rho(tau). Eqs. 5-6 as printed leave out the second term: the LLM would learn
   which words to write but never a hidden state that ranks better. ppo.score_gradient estimates dV/ds
   from the S rankings, ppo.llm_loss adds the term with the token term's divisor (departure 4);
   --no-score-path is the equations to the letter.
8. --pl-std (off) fixes the std of a user's scores before Plackett-Luce (plackett_luce.standardized);
   the score path and the counterfactual advantage take their gradients and values through it.
9. The head's MLP reads h_k through a LayerNorm without parameters (head.py; the paper's f_phi is an
   MLP on the last layer): h_k's scale differs between models, and the initial scores are of unit order.
10. Two PPO epochs per step (--ppo-epochs 2; the paper does not say): the second reuses the traces
   under the clipped ratio, the first is the plain policy gradient (ratio 1).
11. MLP-only (--freeze-llm) samples each user's traces at its first step and reuses them when the
   user comes back (rl_run.RLRun.cached_traces): the frozen policy would only resample the same
   distribution, at the rollout's cost. Validation ranks greedy traces (one fixed trace per pair).
The data and the prompt (12-18, data.py; 12-14 in protocol.py): 12. an item touched twice keeps its first
time; 13. negatives avoid every item the user ever touched; 14. stats.json counts items and interactions
before the history is cut; 15. MovieLens has no time window, its title "unknown" is no title;
16. timestamps are left out of the prompt; 17. a synthetic set (--pointwise: the quickstart's);
18. Fig. 2's prompt reworded, the same three parts and answers (--prompt answer-only: Table 5).
SFT (19-23, sft.py): 19. any local or OpenAI-compatible teacher, its reply's content only; 20. --num-pairs
pairs, half positive; 21. one teacher sample per pair; 22. a per-token mean loss, constant --sft-lr;
23. the reply stripped of surrounding whitespace.
Evaluation (24-28, evaluate.py): 24. the baselines (random, popularity, SASRec, zero-shot prompts,
RecZero, R2ec); 25. greedy traces by default; 26. the bold and the markers of Table 2; 27. Wilcoxon drops
zero differences; 28. a trained method runs with its training's trace settings.
Analyses (29-32, analyses.py): 29. cold-start bins; 30. history-length buckets; 31. history order:
R shuffles per user; 32. the positive moved to first, middle and last.
"""
import os
import sys


def interrupted_before_start():
    """Ctrl-C while torch and transformers load (the first seconds of `python r2rank.py`) or while torchrun's
    processes meet: one line (from rank 0 under torchrun), exit status 130."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print("interrupted before anything started; nothing was written", file=sys.stderr)
    sys.exit(130)


try:  # the imports take seconds, and main's handlers do not exist yet
    import torch

    import data
    import plackett_luce
    import rollout
    from metrics import ndcg_at_k, ndcg_from_scores
    from head import score_traces
    from plackett_luce import standardized
    from ppo import batch_baseline_advantages, counterfactual_advantages, leave_one_out_baseline, reinforce_loss, score_gradient
    from protocol import UsageError
    from machinery import distributed, runs, stops
    from machinery.config import parse_config
    from machinery.rl_run import Bookkeeper, setup_rl, user_generator, users_for_step, validate  # noqa: F401 (validate: for the tests)
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported by another module: the interrupt is its caller's
        raise
    interrupted_before_start()

# ------------------------------------------------------------------------- phases of one step


def signal_share(reward):
    """Share of users [U, S] whose S rankings do not all get the same reward: the only users whose
    rankings the head's REINFORCE can learn from."""
    return (reward != reward[:, :1]).any(1).float().mean().item()


def llm_advantages(cfg, raw_scores, labels, reward, generators):
    """[U, K] advantage of each trace (--advantage; departure 3). raw_scores (the head's, before
    --pl-std), labels [U, K]; reward [U, S]; one generator per user. Under torchrun, U is this rank's
    users; batch reads every rank's."""
    K = raw_scores.shape[1]
    if cfg.advantage == "counterfactual":  # per trace: V(s) - V(s with s_k replaced by the others' mean)
        return torch.cat([counterfactual_advantages(raw_scores[u:u + 1].detach(), labels[u:u + 1], cfg.reward_k,
                                                    cfg.advantage_samples, g, cfg.pl_std) for u, g in enumerate(generators)])
    if cfg.advantage == "batch":  # the user's mean reward minus the other users' (all of the step's users)
        means = torch.tensor(distributed.gather(reward.mean(1).tolist()), device=reward.device)  # [all users]
        return batch_baseline_advantages(means[:, None])[distributed.shard(list(range(len(means))))][:, None].expand(-1, K)
    return reward.mean(1, keepdim=True).expand(-1, K)  # the paper's Eq. (6): the mean reward, no baseline


def update_llm(run, cfg, prompts, traces, advantages, score_grads):
    """theta's step: rollout.ppo_update's clipped PPO epochs (the loss: ppo.llm_loss) over this rank's
    traces, divided by the whole step's token count; under torchrun every rank's gradients are summed.
    Returns the update's statistics (means over the whole step)."""
    step_tokens = distributed.total(sum(int(s.lengths.sum()) for s in traces))  # every rank's
    step_traces = distributed.total(sum(len(s.lengths) for s in traces))
    # autocast inside, around each forward only: its optimizer steps must see no cached bf16 weights
    stats = rollout.ppo_update(run.model, run.optimizers["llm"], prompts, traces, advantages, cfg, run.shared_prefix,
                               step_tokens, distributed.sum_gradients, run.head if score_grads is not None else None,
                               score_grads, step_traces, run.dtype)
    # this rank's shares of the step's means, summed over the ranks; the two gaps are maxima
    return {name: distributed.total(value, "max" if name in ("decode_logp_gap_max", "decode_score_gap") else "sum")
            for name, value in stats.items()}


def update_head(run, loss):
    """phi's step on this rank's share of the head's loss, summed over the ranks."""
    run.optimizers["head"].zero_grad(set_to_none=True)
    loss.backward()
    distributed.sum_gradients(run.head.parameters())
    run.optimizers["head"].step()


# --------------------------------------------------------------------------------------- RL stage


def train_rl(cfg, rank_device=None):
    run = setup_rl(cfg, rank_device)  # data, model, head, optimizers, resume (machinery/rl_run.py)
    if run is None:
        return
    with Bookkeeper(cfg, run) as book:  # metrics, validation, checkpoints, stops (machinery/rl_run.py)
        for step in book.steps():
            # the minibatch B of Algorithm 1: the step's users (under torchrun, this rank's share of them)
            users = distributed.shard(users_for_step(len(run.train), cfg.users_per_step, cfg.seed, step))
            instances = [run.train[i] for i in users]
            generators = [user_generator(cfg.seed, step, i, run.device) for i in users]  # seeded by (seed, step, user)
            labels = torch.tensor([inst["labels"] for inst in instances], device=run.device, dtype=torch.float32)  # [U, K]
            users_share = len(users) / cfg.users_per_step  # this rank's part of every mean over the step's users

            # 1) Alg. 1 lines 1-3: one reasoning trace y_k ~ pi_theta(. | c_u, x_k) per candidate (Eq. 1)
            with book.rollout_phase(step):  # autocast; a stop drops this step (machinery/rl_run.py)
                if cfg.freeze_llm:  # MLP-only: a user's traces sampled once, then reused (departure 11)
                    traces, prompts = run.cached_traces(cfg, instances, generators)
                else:
                    traces, prompts = rollout.rollout_users(run.model, run.tokenizer, instances, cfg, generators,
                                                             fast_decode=run.fast_decode)

            # 2) line 4: scores s_k = f_phi(h_k) (Eq. 2), [U, K], with grad into phi only
            raw_scores = score_traces(run.head, traces)
            scores = standardized(raw_scores, cfg.pl_std)  # departure 8 (off: the raw scores)

            # 3) lines 6-7: S rankings tau ~ Plackett-Luce(s) (Eq. 4), reward rho(tau) = NDCG@reward-k
            rankings = torch.stack([plackett_luce.sample(scores[u].detach(), cfg.num_rankings, g)
                                    for u, g in enumerate(generators)])  # [U, S, K]
            reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), cfg.reward_k)  # [U, S]
            baseline = leave_one_out_baseline(reward) if cfg.baseline else None  # departure 2

            # 4) lines 8 and 11: clipped PPO on the tokens (Eq. 6) and the score path (departure 7), theta updated
            ppo_stats, advantages = {}, None
            if not cfg.freeze_llm:
                advantages = llm_advantages(cfg, raw_scores, labels, reward, generators)  # [U, K], departure 3
                # dV/ds per trace (w.r.t. the raw scores): the head's REINFORCE stopped at s, carried on into theta
                score_grads = score_gradient(raw_scores, rankings, reward, baseline, cfg.pl_std) if cfg.score_path else None
                ppo_stats = update_llm(run, cfg, prompts, traces, advantages, score_grads)
            #    lines 9 and 12: REINFORCE on the head through log P(tau | s) (Eq. 5), phi updated. After theta's
            #    update: the score path read the head's weights, which must be those the scores came from.
            head_loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
            update_head(run, head_loss * users_share)  # this rank's share of the mean over all the step's users

            # 5) log, validate, checkpoint (means over all the step's users, every rank's)
            book.end_step(step, book.row(step, traces, users_share, {
                "reward": reward.mean().item(),
                "reward_std": reward.std(1, correction=0).mean().item(),  # spread over a user's S rankings: REINFORCE's signal
                "signal_share": signal_share(reward),
                "score_std": raw_scores.detach().std(1, correction=0).mean().item(),  # the head's spread of the K scores
                "ndcg@10_greedy": ndcg_from_scores(scores.detach(), labels, 10).mean().item(),  # the scores sorted (not greedy traces)
                "head_loss": head_loss.item(),
                **({} if advantages is None else {"advantage_abs": advantages.abs().mean().item(),
                                                  "advantage_nonzero": (advantages != 0).float().mean().item()})},
                ppo_stats))
    book.close()


def main(argv=None):
    cfg = parse_config(argv, " ".join(__doc__.split("\n\n")[0].split()))
    try:
        rank_device = distributed.start(cfg.dist_timeout)  # under torchrun: join the process group (a plain run: nothing)
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # while waiting for the other processes of torchrun
        interrupted_before_start()
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all
    else:
        sys.stdout = stops.ReaderlessStdout(sys.stdout)  # `| head` must not kill a training run (given back below)
    try:
        if distributed.world() > 1 and cfg.stage in ("sft-data", "sft"):
            raise UsageError(f"--stage {cfg.stage} runs as one process (torchrun covers rl and eval)")
        if cfg.stage == "rl":
            train_rl(cfg, rank_device)
        elif cfg.stage in ("sft-data", "sft"):
            import sft

            sft.build_traces(cfg) if cfg.stage == "sft-data" else sft.train_sft(cfg)
        elif cfg.stage == "eval":
            import evaluate

            evaluate.run_eval(cfg, rank_device)
        else:
            sys.exit(f"error: unknown --stage {cfg.stage!r}")
    except UsageError as error:  # every rank meets the same bad input; rank 0 says so
        if distributed.is_main():
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:  # RuntimeError: the CPU allocator's failure
        if distributed.world() > 1 and "Timed out" in str(error):  # gloo's (NCCL's watchdog aborts the process)
            print(f"error: rank {distributed.rank()} waited more than --dist-timeout {cfg.dist_timeout:g} minutes for the "
                  "others (rank 0 validates and saves alone): raise --dist-timeout", file=sys.stderr)
            sys.exit(1)
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(error):
            raise
        flags = "--micro-batch, --max-new-tokens or --users-per-step, or pass --gradient-checkpointing on or --lora-rank"
        if cfg.stage == "rl" and cfg.num_rankings * cfg.users_per_step >= 1024:  # S x U rankings of K items, and their log-probs
            flags = f"--num-rankings ({cfg.num_rankings} rankings per user), " + flags
        if cfg.stage == "rl" and not cfg.freeze_llm and cfg.advantage == "counterfactual":  # the likeliest first
            flags = f"--advantage-samples ({cfg.advantage_samples} rankings of K + 1 score vectors per user), " + flags
        if distributed.is_main():
            print(f"error: out of memory ({str(error).strip().splitlines()[0][:200]}); lower {flags}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        if not distributed.is_main():  # rank 0 says what is kept, for all
            pass
        elif cfg.stage == "eval":
            print("interrupted: the evaluation stopped before writing its results; nothing was written", file=sys.stderr)
        elif cfg.stage == "sft-data":
            import sft

            print(sft.PAIRS_KEPT, file=sys.stderr)
        else:
            print(f"interrupted: {stops.interrupted_message(cfg.out)}", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.stop()
        if isinstance(sys.stdout, stops.ReaderlessStdout):
            sys.stdout = sys.stdout.stream


if __name__ == "__main__":
    main()

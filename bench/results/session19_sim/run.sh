set -u
# Session 19 (simulated): bash bench/results/session19_sim/run.sh {validate|grid90|next|long "8.7 10 11.5"}
# from the repo root, with ../shared beside it. Each writes its JSON and printed table here.
D=bench/results/session19_sim
T=../shared/workloads/azure_llm_conv_2023.csv
M=bench/results/session15_h100/run1_crash/engine8b_calib.json
X=bench/results/session16_h100/engine/mixed_step_time.json
COMMON="--trace $T --model $M --mixed-step-times $X --loop-ms 1.0 --kv-blocks 1024 --mixed-steps"
R=0.6,0.8,1.0,1.2,1.4,1.6,1.8,2.0,2.2,2.4,2.6,2.8,3.0,3.2,3.6
case $1 in
  validate) for r in cap1 tpot11 tpot11_long; do
      python3 -m dynabatch.bench.sim_vs_live --live bench/results/session17_h100/live/live_8b_mixed_$r.json \
        --trace $T --model $M --mixed-step-times $X --fit-loop-ms --out $D/sim_vs_live_$r.json > $D/sim_vs_live_$r.txt; done ;;
  grid90) python3 -m dynabatch.bench.sim_plan $COMMON --tpot-ms 11.5 --seconds 90 --goal 0 \
      --point fcfs@0.4,0.6,0.8,1.1,1.4,1.8,2.3,2.8,3.4 --point dynamic@0.4,0.6,0.8,1.1,1.4,1.8,2.3,2.8,3.4 \
      --point multibin@0.4,0.6,0.8,1.1,1.4,1.8,2.3,2.8,3.4 --out $D/grid_90s_tpot11.5.json > $D/grid_90s_tpot11.5.txt ;;
  long) for tp in $2; do python3 -m dynabatch.bench.sim_plan $COMMON --tpot-ms $tp --seconds 400 \
      --point fcfs@$R --point fcfs:max_num_seqs=16@$R --point dynamic@$R --point multibin@$R --point dynamic:sla_prefill=false@$R \
      --step-prefill-tokens 128,256,512,8192 --out $D/long_400s_tpot$tp.json > $D/long_400s_tpot$tp.txt; done ;;
  next) python3 -m dynabatch.bench.sim_plan $COMMON --tpot-ms 11.5 --seconds 150 --goal 0 \
      --point fcfs@1.6,2.0,2.4,2.8 --point dynamic@1.6,2.0,2.4,2.8 --out $D/next_150s_tpot11.5.json > $D/next_150s_tpot11.5.txt ;;
esac

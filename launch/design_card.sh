#!/usr/bin/env bash
# The design-card grid: fixed ETF vs learned head, d = K vs 512, on the default digits MLP.
exec "$(dirname "$0")/_sweep.sh" name=design_card head=etf,learned dim=K,512 seed=0,1,2 "$@"

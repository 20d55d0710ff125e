"""Human A/B preference studies (the paper's Fig. 8 and Table 3): study files (`create`: build, load, verify) and
the statistics of the votes (`analysis`: win rates with bootstrap CIs and sign tests, votes per pair, Bradley–Terry,
human-human and model-human agreement, Fleiss' kappa, Krippendorff's alpha, attention checks). The web app that
collects the votes comes next."""

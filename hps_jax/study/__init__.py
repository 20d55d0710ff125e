"""Human A/B preference studies (the paper's Fig. 8 and Table 3): study files (`create`: build, load, verify), the
vote store on SQLite or PostgreSQL (`store`), the participants' web app (`web`), the statistics of the votes
(`analysis`: win rates with bootstrap CIs and sign tests, votes per pair, Bradley-Terry, human-human and model-human
agreement, Fleiss' kappa, Krippendorff's alpha, attention checks) and the report (`report`: JSON, markdown and a
self-contained HTML page with the plots)."""

"""Method experiments (the study of issue 9 and its second domain set): scripts run by hand, not library code."""

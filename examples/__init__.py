"""Programs built on the engine, calling `engine.loop.train` as any user would; the engine does not know them.

    dpo_demo.py      the built-in DPO demo (`python train.py --method dpo`): its SFT starting model, its run, its report
    demo_report.py   the demo's held-out report: preference accuracy and rule-judged generations, before vs after
    demo_rule.py     the rule judge of the bundled arithmetic preference data
"""

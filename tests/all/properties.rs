use std::collections::HashMap;
use std::sync::OnceLock;

use modrun::module::{Manifest, ModuleLimits};
use modrun::{BackgroundTaskManager, Error, ModuleHost, ModuleRunner, RunRegistry, RunStatus};
use proptest::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::support::{plugins_dir, test_host_config};

const CEILING: usize = 1 << 30;

/// A TOML value for a number key: in range, out of range, of the wrong
/// type, or absurd.
fn toml_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..20_000).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        Just("inf".to_owned()),
        Just("nan".to_owned()),
        Just("-0.0".to_owned()),
        Just("\"ten\"".to_owned()),
        Just("[]".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the numbers, the parser answers; what it accepts is within
    /// the documented bounds, and what is within them it accepts.
    #[test]
    fn the_manifest_parser_keeps_every_limit_within_its_bounds(
        timeout in toml_number(),
        memory in toml_number(),
        concurrent in toml_number(),
        output in toml_number(),
        keys in proptest::sample::subsequence(vec![0usize, 1, 2, 3], 0..=4),
    ) {
        let names = ["timeout_secs", "memory_mib", "max_concurrent", "max_output_kib"];
        let values = [&timeout, &memory, &concurrent, &output];
        let mut text = String::from("[limits]\n");
        for &key in &keys {
            text.push_str(&format!("{} = {}\n", names[key], values[key]));
        }
        let given = |key: usize| keys.contains(&key).then(|| values[key].parse::<f64>().ok()).flatten();
        let in_range = [
            given(0).is_none_or(|x| (0.001..=7.0 * 86_400.0).contains(&x)),
            given(1).is_none_or(|x| x.fract() == 0.0 && x >= 1.0 && x <= (CEILING >> 20) as f64),
            given(2).is_none_or(|x| x.fract() == 0.0 && (1.0..=10_000.0).contains(&x)),
            given(3).is_none_or(|x| x.fract() == 0.0 && (1.0..=65_536.0).contains(&x)),
        ];
        let well_typed = keys.iter().all(|&key| {
            let value = values[key];
            let is_integer = value.parse::<i64>().is_ok();
            match key {
                0 => is_integer || value.parse::<f64>().is_ok() && !value.starts_with('"'),
                _ => is_integer,
            }
        });
        match Manifest::parse(&text, &ModuleLimits::default(), CEILING) {
            Ok(manifest) => {
                let limits = manifest.limits;
                prop_assert!(limits.timeout.as_secs_f64() > 0.0 && limits.timeout.as_secs() <= 7 * 86_400);
                prop_assert!((1 << 20..=CEILING).contains(&limits.memory_bytes));
                prop_assert!(limits.max_concurrent.is_none_or(|n| (1..=10_000).contains(&n)));
                prop_assert!((1 << 10..=64 << 20).contains(&limits.max_output_bytes));
            }
            Err(message) => {
                prop_assert!(!message.is_empty());
                prop_assert!(
                    !(well_typed && in_range.iter().all(|ok| *ok)),
                    "refused a manifest within bounds: {text:?}: {message}"
                );
            }
        }
    }
}

/// One runtime and one runner of `hello` for every case of the parameter
/// property: loading a module per case would dominate its time.
fn hello_runner() -> &'static (tokio::runtime::Runtime, ModuleRunner, tempfile::TempDir) {
    static RUNNER: OnceLock<(tokio::runtime::Runtime, ModuleRunner, tempfile::TempDir)> =
        OnceLock::new();
    RUNNER.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = plugins_dir(&["hello"]);
        let runner = runtime.block_on(async {
            let host = ModuleHost::new(test_host_config()).unwrap();
            host.load_dir(dir.path()).await.unwrap();
            ModuleRunner::new(host, BackgroundTaskManager::new(RunRegistry::in_memory()))
        });
        (runtime, runner, dir)
    })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-zA-Z0-9 ]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("name|times|[a-z]{1,6}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any JSON is either accepted (and the run recorded) or refused as
    /// invalid parameters, with a message naming the problem; never a panic,
    /// never a run recorded for refused parameters.
    #[test]
    fn parameters_are_accepted_or_refused_with_a_reason(parameters in json_value()) {
        let (runtime, runner, _) = hello_runner();
        let recorded_before = runtime.block_on(runner.registry().recent_runs(usize::MAX)).unwrap().len();
        match runtime.block_on(runner.start("hello", parameters.clone())) {
            Ok(run_id) => {
                let run = runtime.block_on(runner.registry().get_run(&run_id)).unwrap();
                prop_assert!(run.is_some());
            }
            Err(Error::InvalidParameters { problems, .. }) => {
                prop_assert!(!problems.is_empty());
                let recorded = runtime.block_on(runner.registry().recent_runs(usize::MAX)).unwrap().len();
                prop_assert_eq!(recorded, recorded_before);
            }
            Err(other) => prop_assert!(false, "{parameters}: unexpected {other:?}"),
        }
    }
}

/// What happens to one of a few runs, in some order.
#[derive(Debug, Clone, Copy)]
enum Step {
    Start(usize),
    Cancel(usize),
    Finish(usize),
    Fail(usize),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0..4usize).prop_map(Step::Start),
        (0..4usize).prop_map(Step::Cancel),
        (0..4usize).prop_map(Step::Finish),
        (0..4usize).prop_map(Step::Fail),
    ];
    proptest::collection::vec(step, 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// However starts, cancels and finishes interleave, every run ends in exactly one
    /// terminal status, its history follows the status flow, and a cancel
    /// reported true is a run recorded cancelled.
    #[test]
    fn every_interleaving_of_start_cancel_and_finish_ends_each_run_once(steps in steps()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let registry = RunRegistry::in_memory();
            let manager = BackgroundTaskManager::new(registry.clone());
            // For each slot: the run started there last, and how to end it.
            let mut live: HashMap<usize, (String, oneshot::Sender<bool>)> = HashMap::new();
            let mut cancelled_ok = Vec::new();
            let mut all = Vec::new();
            for step in steps {
                match step {
                    Step::Start(slot) => {
                        let (end, ended) = oneshot::channel::<bool>();
                        let run = modrun::Run::new("prop", "Prop").with_id(format!("run-{slot}-{}", all.len()));
                        let run_id = manager
                            .start_task(run, async move {
                                match ended.await {
                                    Ok(true) => Ok("done"),
                                    _ => Err("failed on purpose"),
                                }
                            })
                            .await
                            .unwrap()
                            .into_id();
                        all.push(run_id.clone());
                        live.insert(slot, (run_id, end));
                    }
                    Step::Cancel(slot) => {
                        if let Some((run_id, _)) = live.get(&slot)
                            && manager.cancel_task(run_id).await.unwrap()
                        {
                            cancelled_ok.push(run_id.clone());
                        }
                    }
                    Step::Finish(slot) | Step::Fail(slot) => {
                        if let Some((_, end)) = live.remove(&slot) {
                            let _ = end.send(matches!(step, Step::Finish(_)));
                        }
                    }
                }
            }
            for (_, (_, end)) in live.drain() {
                let _ = end.send(true);
            }
            manager.wait_all().await;
            prop_assert_eq!(manager.active_task_count(), 0);
            for run_id in &all {
                let run = registry.get_run(run_id).await.unwrap().unwrap();
                prop_assert!(run.status.is_terminal(), "{} is {}", run_id, run.status);
                let history: Vec<RunStatus> = registry
                    .history(run_id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|change| change.status)
                    .collect();
                prop_assert_eq!(history[0], RunStatus::Queued);
                prop_assert_eq!(history.iter().filter(|s| s.is_terminal()).count(), 1);
                prop_assert!(history.windows(2).all(|pair| pair[0].can_become(pair[1])), "{:?}", history);
                prop_assert_eq!(*history.last().unwrap(), run.status);
                prop_assert_eq!(
                    cancelled_ok.contains(run_id),
                    run.status == RunStatus::Cancelled,
                    "{}: cancel said {}, run is {}", run_id, cancelled_ok.contains(run_id), run.status
                );
            }
            Ok(())
        })?;
    }
}

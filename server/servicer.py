"""The gRPC handlers: validate, hand the request to the scheduler, stream what comes back."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from condgen.bundle import Manifest
from condgen.server.errors import grpc_errors
from condgen.server.limits import Defaults, Limits
from condgen.server.requests import GeneratedRecord, GenerationSummary
from condgen.server.scheduler import Scheduler
from condgen.server.telemetry import Telemetry
from condgen.server.validation import to_spec
from condgen.v1 import generator_pb2 as pb
from condgen.v1 import generator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def summary_message(summary: GenerationSummary) -> pb.Summary:
    return pb.Summary(
        records_accepted=summary.records_accepted,
        lines_parsed=summary.lines_parsed,
        rejected=pb.RejectionCounts(**dict(summary.rejected)),
        tokens_generated=summary.tokens_generated,
        elapsed_seconds=summary.elapsed_seconds,
        rounds=summary.rounds,
        complete=summary.complete,
        incomplete_intents=summary.incomplete_intents,
    )


class GeneratorServicer(pb_grpc.GeneratorServicer):
    """condgen.v1.Generator over one bundle."""

    def __init__(
        self,
        scheduler: Scheduler,
        manifest: Manifest,
        limits: Limits,
        defaults: Defaults,
        telemetry: Telemetry | None = None,
    ):
        self.scheduler = scheduler
        self.manifest = manifest
        self.limits = limits
        self.defaults = defaults
        self.telemetry = telemetry or Telemetry()  # read by @grpc_errors: request ids, metrics, log lines

    @grpc_errors
    async def Generate(self, request, context):
        spec = to_spec(
            request,
            self.manifest.intents,
            self.limits,
            self.defaults,
            self.scheduler.config.max_batch_size,
            self.manifest.separator,
            self.scheduler.label_checker is not None,
        )
        handle = self.scheduler.submit(spec, time_left=context.time_remaining())
        try:
            async for item in handle:
                if isinstance(item, GeneratedRecord):
                    yield pb.GenerateResponse(
                        record=pb.Record(
                            intent=item.intent,
                            text=item.text,
                            index=item.index,
                            fidelity=item.fidelity,
                            predicted_intent=item.predicted_intent,
                            label_margin=item.label_margin,
                        )
                    )
                else:
                    yield pb.GenerateResponse(summary=summary_message(item))
        finally:
            handle.cancel()  # no-op once finished; frees the batch when the client went away

    @grpc_errors
    async def ListIntents(self, request, context):
        return pb.ListIntentsResponse(
            intents=[
                pb.IntentInfo(name=name, example_count=count) for name, count in sorted(self.manifest.intents.items())
            ]
        )

    @grpc_errors
    async def GetModelInfo(self, request, context):
        m = self.manifest
        limits = {
            **self.limits.to_dict(),
            "max_batch_size": self.scheduler.config.max_batch_size,
            "max_batch_tokens": self.scheduler.config.max_batch_tokens,
            "max_active_requests": self.scheduler.config.max_active_requests,
            "defaults": asdict(self.defaults),  # with the bundle's generate block applied
            "bundle_generate_defaults": m.generate_defaults,
            "label_check": (asdict(self.scheduler.label_checker.config) if self.scheduler.label_checker else None),
        }
        return pb.ModelInfo(
            base_model=m.base_model,
            format_version=m.format_version,
            training_config_json=json.dumps(m.training_config),
            training_stats_json=json.dumps(m.training_stats),
            onnx_json=json.dumps(vars(m.onnx)),
            device=self.scheduler.engine.provider,
            num_intents=len(m.intents),
            limits_json=json.dumps(limits),
            scheduler_json=json.dumps(self.scheduler.stats()),
            privacy_json=json.dumps(m.privacy) if m.privacy else "",
            runtime=self.scheduler.engine.runtime,
            openvino_json=json.dumps(m.openvino) if m.openvino else "",
        )

"""The deploy tests' side of moto: IAM keys, the request recorder, reading snapshots back.

Every call goes to the moto_server the test started on 127.0.0.1 (argv[1]); it prints JSON.
"""
import base64
import hashlib
import json
import sys
import urllib.parse
import urllib.request

import boto3

url, command = sys.argv[1], sys.argv[2]
assert url.startswith("http://127.0.0.1:"), url


def client(service, key=None, secret=None):
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=sys.argv[3] if len(sys.argv) > 3 else "eu-west-1",
        aws_access_key_id=key or "bootstrap",
        aws_secret_access_key=secret or "bootstrap",
    )


if command == "serve":
    # moto 5.2.5 checks the signature of a request with an empty body (EBS CompleteSnapshot,
    # GetSnapshotBlock) as if its body were its headers form-encoded, so no client's signature
    # matches (boto3's own CompleteSnapshot fails the same way); AWS signs an empty body as
    # empty. Fix that one thing; every signature is still checked. (A form POST, EC2's Query
    # API, reaches this with its body in the parsed form, which moto re-encodes: kept.)
    from moto.iam import access_control
    from moto.server import main

    create = access_control.IAMRequestBase._create_aws_request

    def create_with_empty_body(self):
        form = self._headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded")
        if not self._body and not form:
            self._data = b""
        return create(self)

    access_control.IAMRequestBase._create_aws_request = create_with_empty_body

    # The recorder appends each request to its file unlocked: fuse's parallel block uploads
    # would interleave their lines. One at a time.
    import threading

    from moto.moto_api._internal.recorder.models import Recorder

    record, lock = Recorder._record_request, threading.Lock()

    def record_locked(self, *args, **kwargs):
        with lock:
            return record(self, *args, **kwargs)

    Recorder._record_request = record_locked

    # moto's EC2 lists a snapshot that the EBS direct APIs started as completed at once; AWS
    # lists it pending until CompleteSnapshot. Keep the two in step, as AWS does.
    from moto.ebs.models import EBSBackend

    start_snapshot, complete_snapshot = EBSBackend.start_snapshot, EBSBackend.complete_snapshot

    def start_pending(self, *args, **kwargs):
        snapshot = start_snapshot(self, *args, **kwargs)
        self.ec2_backend.snapshots[snapshot.snapshot_id].status = "pending"
        return snapshot

    def complete_both(self, snapshot_id, *args, **kwargs):
        status = complete_snapshot(self, snapshot_id, *args, **kwargs)
        self.ec2_backend.snapshots[snapshot_id].status = status
        return status

    EBSBackend.start_snapshot = start_pending
    EBSBackend.complete_snapshot = complete_both

    # moto's instances do not run, so its GetConsoleOutput is a fixed sample. A test that boots
    # them (the blue/green tests) writes each VM's console to MOTO_CONSOLE_DIR/<instance id>.
    import os

    from moto.ec2.responses import general

    def console_output(self):
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        path = os.path.join(os.environ.get("MOTO_CONSOLE_DIR", "/nonexistent"), instance.id)
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError:
            text = general.SAMPLE_CONSOLE_OUTPUT
        return general.ActionResult({
            "InstanceId": instance.id,
            "Timestamp": general.utcnow(),
            "Output": general.Base64EncodedString.from_raw_string(text),
        })

    general.General.get_console_output = console_output
    main(["-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]])
elif command == "keys":
    # The first actions moto lets through without authentication (INITIAL_NO_AUTH_ACTION_COUNT).
    iam = client("iam")
    iam.create_user(UserName="deployer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="deployer", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="deployer")["AccessKey"]
    print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
elif command in ("start-recording", "reset-recording"):
    # Resetting makes the recording file, which downloading an empty recording needs.
    for step in ("reset-recording", command):
        req = urllib.request.Request(f"{url}/moto-api/recorder/{step}", method="POST")
        urllib.request.urlopen(req).read()
    print("{}")
elif command == "recording":
    text = urllib.request.urlopen(f"{url}/moto-api/recorder/download-recording").read().decode()
    calls = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        body = entry.get("body") or ""
        raw = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        path = urllib.parse.urlsplit(entry["url"]).path
        call = {"method": entry["method"], "path": path, "headers": headers}
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            call["params"] = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        elif headers.get("content-type", "").startswith("application/json"):
            call["json"] = json.loads(raw or b"{}")
        else:
            call["body_sha256"] = base64.b64encode(hashlib.sha256(raw).digest()).decode()
            call["body_len"] = len(raw)
        calls.append(call)
    print(json.dumps(calls))
elif command == "blocks":
    key, secret, snapshot = sys.argv[4], sys.argv[5], sys.argv[6]
    ebs = client("ebs", key, secret)
    listing = ebs.list_snapshot_blocks(SnapshotId=snapshot)
    blocks = {}
    for b in listing["Blocks"]:
        got = ebs.get_snapshot_block(SnapshotId=snapshot, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])
        data = got["BlockData"].read()
        blocks[str(b["BlockIndex"])] = {"sha256": hashlib.sha256(data).hexdigest(), "len": len(data)}
        if len(sys.argv) > 7:
            # The blocks' bytes too, one file per block index, for a test to lay them out.
            with open(f"{sys.argv[7]}/{b['BlockIndex']}", "wb") as f:
                f.write(data)
    print(json.dumps(blocks))
elif command == "image":
    key, secret, ami = sys.argv[4], sys.argv[5], sys.argv[6]
    ec2 = client("ec2", key, secret)
    image = ec2.describe_images(ImageIds=[ami])["Images"][0]
    print(json.dumps({"Name": image.get("Name"), "Tags": {t["Key"]: t["Value"] for t in image.get("Tags", [])}}))
elif command == "leftover":
    # What a run stopped mid-upload leaves: a pending snapshot tagged with the digest, some
    # blocks in it (here one of the disk's non-zero block indexes, with other bytes).
    # With a parent snapshot and its digest (argv 8, 9): an incremental upload's leftover.
    key, secret, digest, index = sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7])
    ebs = client("ebs", key, secret)
    tags = [{"Key": "fuse:digest", "Value": digest}]
    if len(sys.argv) > 9:
        tags += [{"Key": "fuse:parent", "Value": sys.argv[8]}, {"Key": "fuse:parent-digest", "Value": sys.argv[9]}]
    snap = ebs.start_snapshot(VolumeSize=1, Tags=tags)
    data = b"leftover" * (524288 // 8)
    ebs.put_snapshot_block(
        SnapshotId=snap["SnapshotId"], BlockIndex=index, BlockData=data, DataLength=len(data),
        Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(), ChecksumAlgorithm="SHA256",
    )
    print(json.dumps({"id": snap["SnapshotId"]}))
elif command == "snapshots":
    key, secret, digest = sys.argv[4], sys.argv[5], sys.argv[6]
    found = client("ec2", key, secret).describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:fuse:digest", "Values": [digest]}]
    )["Snapshots"]
    print(json.dumps([{"id": s["SnapshotId"], "state": s["State"]} for s in found]))
elif command == "deregister":
    key, secret, ami = sys.argv[4], sys.argv[5], sys.argv[6]
    client("ec2", key, secret).deregister_image(ImageId=ami)
    print("{}")
elif command == "tag":
    # A tag as another fuse (or a crashed one) would have left it.
    key, secret, resource, tag_key, tag_value = sys.argv[4:9]
    client("ec2", key, secret).create_tags(Resources=[resource], Tags=[{"Key": tag_key, "Value": tag_value}])
    print("{}")
elif command == "role":
    # A role allowed everything, and a user allowed nothing but assuming it: what a CI job's
    # base profile and its deploy role look like. The role trusts the user by its ARN (moto
    # matches a trust policy's principal exactly: an account root there would not admit it).
    key, secret = sys.argv[4], sys.argv[5]
    iam = client("iam", key, secret)
    user = iam.create_user(UserName="assumer")["User"]
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": user["Arn"]}, "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="fuse-deployer", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_role_policy(RoleName="fuse-deployer", PolicyName="all", PolicyDocument=json.dumps(everything))
    # Resource "*": moto matches a request against "*" only, never against the role's ARN.
    only = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}
    iam.put_user_policy(UserName="assumer", PolicyName="assume", PolicyDocument=json.dumps(only))
    got = iam.create_access_key(UserName="assumer")["AccessKey"]
    print(json.dumps({"role": role["Arn"], "id": got["AccessKeyId"], "secret": got["SecretAccessKey"]}))
elif command == "group":
    # A security group as a fuse run that stopped before tagging it leaves it: named, untagged.
    key, secret, name = sys.argv[4:7]
    got = client("ec2", key, secret).create_security_group(GroupName=name, Description="left-by-a-stopped-run")
    print(json.dumps({"id": got["GroupId"]}))
elif command in ("stop", "terminate"):
    # An instance that leaves running under fuse (capacity, a crash, someone else's hand).
    key, secret, instance = sys.argv[4], sys.argv[5], sys.argv[6]
    ec2 = client("ec2", key, secret)
    if command == "stop":
        ec2.stop_instances(InstanceIds=[instance])
    else:
        ec2.terminate_instances(InstanceIds=[instance])
    print("{}")
elif command == "address":
    # An Elastic IP tagged for an app and environment, as a one-instance deployment leaves it.
    key, secret, app, env = sys.argv[4:8]
    ec2 = client("ec2", key, secret)
    got = ec2.allocate_address(Domain="vpc")
    ec2.create_tags(Resources=[got["AllocationId"]], Tags=[{"Key": "fuse:app", "Value": app}, {"Key": "fuse:env", "Value": env}])
    print(json.dumps({"ip": got["PublicIp"]}))
elif command == "world":
    # What the blue/green harness plays EC2's data plane from: every instance (its state,
    # public address, AMI, tags and user-data), every address and every security group.
    key, secret = sys.argv[4], sys.argv[5]
    ec2 = client("ec2", key, secret)
    instances = []
    for r in ec2.describe_instances()["Reservations"]:
        for i in r["Instances"]:
            state = i["State"]["Name"]
            user_data = ""
            if state != "terminated":
                got = ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")
                user_data = base64.b64decode(got.get("UserData", {}).get("Value", "")).decode()
            instances.append({
                "id": i["InstanceId"], "state": state, "ip": i.get("PublicIpAddress"),
                "image": i["ImageId"], "type": i["InstanceType"], "user_data": user_data,
                "tags": {t["Key"]: t["Value"] for t in i.get("Tags", [])},
            })
    addresses = [
        {"ip": a["PublicIp"], "allocation": a["AllocationId"], "instance": a.get("InstanceId"), "tags": {t["Key"]: t["Value"] for t in a.get("Tags", [])}}
        for a in ec2.describe_addresses()["Addresses"]
    ]
    groups = [
        {
            "id": g["GroupId"], "name": g["GroupName"], "tags": {t["Key"]: t["Value"] for t in g.get("Tags", [])},
            "rules": [
                {"port": p.get("FromPort"), "cidrs": [r["CidrIp"] for r in p.get("IpRanges", [])],
                 "groups": [u["GroupId"] for u in p.get("UserIdGroupPairs", [])]}
                for p in g.get("IpPermissions", [])
            ],
        }
        for g in ec2.describe_security_groups()["SecurityGroups"]
    ]
    # The load balancers: their DNS names, listeners (port, the group they forward to), and
    # every target group with its tags and registered targets. One deleted while it is read
    # (fuse runs meanwhile) is left out.
    from botocore.exceptions import ClientError

    elb = client("elbv2", key, secret)
    balancers = []
    for lb in elb.describe_load_balancers()["LoadBalancers"]:
        try:
            tags = elb.describe_tags(ResourceArns=[lb["LoadBalancerArn"]])["TagDescriptions"]
            listeners = [
                {"port": l["Port"], "target_group": next((a.get("TargetGroupArn") for a in l["DefaultActions"]), None)}
                for l in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
            ]
        except ClientError:
            continue
        balancers.append({
            "arn": lb["LoadBalancerArn"], "name": lb["LoadBalancerName"], "dns": lb["DNSName"],
            "security_groups": lb.get("SecurityGroups", []), "listeners": listeners,
            "tags": {t["Key"]: t["Value"] for d in tags for t in d.get("Tags", [])},
        })
    target_groups = []
    for g in elb.describe_target_groups()["TargetGroups"]:
        try:
            tags = elb.describe_tags(ResourceArns=[g["TargetGroupArn"]])["TagDescriptions"]
            health = elb.describe_target_health(TargetGroupArn=g["TargetGroupArn"])["TargetHealthDescriptions"]
            attrs = elb.describe_target_group_attributes(TargetGroupArn=g["TargetGroupArn"])["Attributes"]
        except ClientError:
            continue
        target_groups.append({
            "arn": g["TargetGroupArn"], "name": g["TargetGroupName"], "port": g.get("Port"),
            "health_path": g.get("HealthCheckPath"),
            "targets": [h["Target"]["Id"] for h in health if h["TargetHealth"]["State"] not in ("draining", "unused")],
            "attributes": {a["Key"]: a["Value"] for a in attrs},
            "tags": {t["Key"]: t["Value"] for d in tags for t in d.get("Tags", [])},
        })
    print(json.dumps({
        "instances": instances, "addresses": addresses, "groups": groups,
        "balancers": balancers, "target_groups": target_groups,
    }))
elif command == "volume":
    # The volume an instance of an AMI would boot, written into a file: the snapshot of the
    # AMI's digest (moto's RegisterImage keeps only name and description, so its AMI's block
    # device is a snapshot of moto's own: the one fuse uploaded is found by its fuse:digest
    # tag, which the AMI must carry too), its blocks read back over those of the snapshots it
    # was uploaded incrementally onto (fuse:parent; moto ignores ParentSnapshotId, AWS would
    # lay them so).
    key, secret, ami, digest, out = sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8]
    ec2, ebs = client("ec2", key, secret), client("ebs", key, secret)
    image = ec2.describe_images(ImageIds=[ami])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
    if tags.get("fuse:digest") != digest:
        sys.exit(f"{ami} is tagged fuse:digest={tags.get('fuse:digest')}, not {digest}")
    found = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:fuse:digest", "Values": [digest]}])["Snapshots"]
    chain, snap = [], [s for s in found if s["State"] == "completed"][0]["SnapshotId"]
    while snap:
        chain.insert(0, snap)
        found = ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]
        snap = {t["Key"]: t["Value"] for t in found.get("Tags", [])}.get("fuse:parent")
    with open(out, "wb") as f:
        for snap in chain:
            for b in ebs.list_snapshot_blocks(SnapshotId=snap)["Blocks"]:
                got = ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])
                f.seek(b["BlockIndex"] * 524288)
                f.write(got["BlockData"].read())
    print(json.dumps({"chain": chain}))
else:
    sys.exit(f"unknown command {command}")
